"""The numbers of prefopt.judge by hand: pass@k against its formula and brute force, paired wins with ties, the
interval, per-prompt rows and summaries of hand-made replies, and the implicit-reward accuracy."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from prefopt.judge.pairs import preference_rows
from prefopt.judge.stats import ks_for, mean_interval, paired_wins, pass_at_k
from prefopt.judge.summary import preference_summary, prompt_frame, summarise

Z95 = 1.959963984540054


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_is_the_formula_and_the_brute_force_count(n):
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            formula = 1 - math.comb(n - c, k) / math.comb(n, k)  # Chen et al. 2021, eq. 1
            subsets = list(itertools.combinations(correct, k))
            brute = sum(any(s) for s in subsets) / len(subsets)  # P(some correct sample among k of the n)
            assert pass_at_k(n, c, k) == pytest.approx(formula, abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_by_hand_and_its_bad_arguments():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # c / n
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 2, 3) == 1.0
    assert pass_at_k(200, 3, 100) == pytest.approx(1 - math.comb(197, 100) / math.comb(200, 100))
    for n, c, k in [(3, 4, 1), (3, 1, 4), (3, 1, 0), (3, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)
    assert ks_for(1) == [1] and ks_for(4) == [1, 2, 4] and ks_for(6) == [1, 2, 4, 6]


def test_paired_wins_count_ties_as_half_and_leave_unscorable_replies_out():
    assert paired_wins([3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 5.0, 0.0]) == [1.0, 0.5, 0.0, 0.5]
    wins = paired_wins([math.nan, 1.0], [0.0, math.nan])
    assert all(math.isnan(w) for w in wins)
    with pytest.raises(ValueError, match="2 scores against 1"):
        paired_wins([1.0, 2.0], [1.0])


def test_mean_interval_by_hand():
    # mean 0.7; sd = sqrt((3 * 0.3^2 + 0.2^2 + 0.7^2) / 4) = sqrt(0.2); se = sd / sqrt(5) = 0.2
    mean, low, high = mean_interval([1, 1, 0.5, 0, 1])
    assert (mean, low, high) == pytest.approx((0.7, 0.7 - Z95 * 0.2, 0.7 + Z95 * 0.2))
    assert mean_interval([1, 1, 0.5, 0, 1], bounds=(0.0, 1.0))[2] == 1.0  # 1.092 clipped
    assert mean_interval([1, 1, 0.5, 0, 1], level=0.5)[1] == pytest.approx(0.7 - 0.6744897501960817 * 0.2)
    one = mean_interval([0.3])
    assert one[0] == 0.3 and math.isnan(one[1]) and math.isnan(one[2])
    assert mean_interval([1.0, math.nan, 0.0]) == mean_interval([1.0, 0.0])  # unscorable units left out


def test_a_share_that_is_one_on_every_prompt_gets_the_exact_interval_not_zero_width():
    # Clopper-Pearson for 64 of 64: the low end solves P(64 of 64 | p) = p^64 = 0.025
    assert mean_interval([1.0] * 64, bounds=(0.0, 1.0)) == pytest.approx((1.0, 0.025 ** (1 / 64), 1.0))
    assert mean_interval([0.0] * 64, bounds=(0.0, 1.0)) == pytest.approx((0.0, 0.0, 1 - 0.025 ** (1 / 64)))
    assert 0.025 ** (1 / 64) == pytest.approx(0.9440, abs=1e-4)
    assert mean_interval([0.5] * 8, bounds=(0.0, 1.0)) == (0.5, 0.5, 0.5)  # all ties: no spread, not a boundary
    assert mean_interval([1.0] * 8) == (1.0, 1.0, 1.0)  # an unbounded measure keeps the normal interval


def replies(scores: list[list[float]], **extra) -> list[dict]:
    """Reply rows of a hand-made judge "score": scores[i][j] for prompt i, sample j."""
    return [{"prompt_index": i, "sample": j, "score": s, "length": 3 + j, **extra}
            for i, row in enumerate(scores) for j, s in enumerate(row)]


def test_win_rate_pass_at_k_and_intervals_of_hand_made_replies():
    mine = replies([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], kl=0.5)
    theirs = replies([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]], kl=0.0)
    frame = prompt_frame(mine, ["score"], theirs)
    # wins per (prompt, sample): p0 (1, 0.5), p1 (0.5, 1), p2 (0, 0.5) -> per prompt 0.75, 0.75, 0.25
    assert frame["win_rate"].tolist() == [0.75, 0.75, 0.25]
    assert frame["correct"].tolist() == [1, 2, 0]  # the scores are all 0/1: verifiable, threshold 1
    assert frame["pass@1"].tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert frame["pass@2"].tolist() == pytest.approx([1.0, 1.0, 0.0])
    summary = summarise(frame)
    assert summary["prompts"] == 3 and summary["samples_per_prompt"] == 2
    assert summary["win_rate"] == pytest.approx(7 / 12)
    se = math.sqrt(((0.75 - 7 / 12) ** 2 * 2 + (0.25 - 7 / 12) ** 2) / 2) / math.sqrt(3)  # 0.1667
    assert summary["win_rate_ci"] == pytest.approx([7 / 12 - Z95 * se, 7 / 12 + Z95 * se])
    assert summary["score"] == pytest.approx(0.5) and summary["pass@2"] == pytest.approx(2 / 3)
    assert summary["score_ci"] == [0.0, 1.0]  # 0.5 +- 1.96 * 0.5 / sqrt(3), clipped: every score is 0 or 1
    assert summary["kl"] == 0.5 and summary["kl_ci"] == [0.5, 0.5] and summary["length"] == 3.5
    # the baseline against itself: every pair a tie
    assert summarise(prompt_frame(theirs, ["score"], theirs))["win_rate_ci"] == [0.5, 0.5]


def test_pass_threshold_and_a_continuous_judge():
    rows = replies([[0.2, 0.9], [0.6, 0.4]])
    assert "pass@1" not in prompt_frame(rows, ["score"])  # not verifiable: no pass@k
    frame = prompt_frame(rows, ["score"], threshold=0.5)
    assert frame["correct"].tolist() == [1, 1] and frame["pass@2"].tolist() == [1.0, 1.0]
    wide = summarise(prompt_frame(replies([[2.0, 3.0], [0.5, 0.5]]), ["score"]))  # prompt means 2.5, 0.5: se 1
    assert wide["score_ci"] == pytest.approx([1.5 - Z95, 1.5 + Z95])  # a continuous score: not clipped to [0, 1]
    with pytest.raises(ValueError, match="no reply to prompt 1 sample 1"):
        prompt_frame(rows, ["score"], rows[:3])


def test_implicit_reward_accuracy_by_hand():
    policy = (torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -2.0, -1.0]))
    reference = (torch.tensor([-1.5, -2.0, -3.0]), torch.tensor([-1.5, -2.0, -2.0]))
    rows = preference_rows(policy, reference)
    # margins: (0.5) - (-0.5) = 1; 0 - 0 = 0; 0 - 1 = -1
    assert [r["implicit_margin"] for r in rows] == [1.0, 0.0, -1.0]
    assert [r["implicit_acc"] for r in rows] == [1.0, 0.5, 0.0]
    assert [r["logprob_acc"] for r in rows] == [1.0, 0.5, 0.0]
    summary = preference_summary(rows)
    assert summary["pairs"] == 3 and summary["implicit_acc"] == 0.5 and summary["logprob_acc"] == 0.5
    same = preference_summary(preference_rows(reference, reference))
    assert same["implicit_acc"] == 0.5 and same["implicit_acc_ci"] == [0.5, 0.5]  # the reference: every pair a tie
