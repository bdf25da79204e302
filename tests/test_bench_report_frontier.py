"""prefopt.bench.report.frontier: every expected value below is worked out by hand in the comment beside it."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from prefopt.bench.report.frontier import (at_kl, best_of_n_expected, best_under_budget, bon_kl, envelope_at_kl,
                                           gao_curve, gao_fit, segments_at)


def test_best_of_n_kl_is_log_n_minus_n_minus_1_over_n():
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.1931
    assert bon_kl(256) == pytest.approx(math.log(256) - 255 / 256)  # 4.5492


def test_best_of_n_expectation_over_subsets_by_hand():
    keys, values = np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0])
    # n=2: subsets {1,2} -> 20, {1,3} -> 30, {2,3} -> 30: mean 80/3; n=1: the mean 20; n=3: the top 30
    assert best_of_n_expected(keys, values, [1, 2, 3]).tolist() == pytest.approx([20.0, 80 / 3, 30.0])
    # ties: keys (1, 2, 2), values (0, 4, 8); n=2: {a,b} -> 4, {a,c} -> 8, {b,c} -> tie -> (4+8)/2 = 6: mean 6
    assert best_of_n_expected(np.array([1.0, 2.0, 2.0]), np.array([0.0, 4.0, 8.0]), [2]) == pytest.approx([6.0])
    # several columns at once, order of the samples irrelevant
    both = best_of_n_expected(keys[::-1], np.stack([values, -values], 1)[::-1], [2])
    assert both[0].tolist() == pytest.approx([80 / 3, -80 / 3])
    with pytest.raises(ValueError, match="1 <= n <= 3"):
        best_of_n_expected(keys, values, [4])


def test_best_of_n_expectation_matches_every_subset_with_ties():
    rng = np.random.default_rng(0)
    keys, values = rng.integers(0, 3, 7).astype(float), rng.normal(size=7)
    for n in range(1, 8):  # every subset; ties broken uniformly at random among the subset's tied maxima
        picks = [np.mean([values[j] for j in subset if keys[j] == keys[list(subset)].max()])
                 for subset in itertools.combinations(range(7), n)]
        assert best_of_n_expected(keys, values, [n])[0] == pytest.approx(np.mean(picks))


def test_gold_at_kl_uses_measured_brackets_only():
    kl = np.array([1.0, 3.0, 5.0])
    gold = np.array([[1.0, 3.0], [2.0, 6.0], [4.0, 4.0]])  # two prompts
    assert segments_at(kl, 2.0) == [(0, 0.5)]
    (point,) = at_kl(kl, gold, 2.0)
    assert point.values.tolist() == [1.5, 4.5] and (point.kl_low, point.kl_high) == (1.0, 3.0)  # halfway
    assert at_kl(kl, gold, 4.5)[0].values.tolist() == pytest.approx([3.5, 4.5])  # three quarters from KL 3 to 5
    assert at_kl(kl, gold, 0.5) == []  # below the first checkpoint: no chord from the start
    assert at_kl(kl, gold, 5.5) == []  # never reached
    # KL that rises and falls again (a collapsing run): both crossings of KL 2 are candidates
    assert segments_at(np.array([1.0, 3.0, 1.0]), 2.0) == [(0, 0.5), (1, 0.5)]


def test_upper_envelope_takes_the_best_bracketing_setting_per_seed():
    low = (np.array([1.0, 3.0]), np.array([[1.0], [2.0]]))  # at KL 2: 1.5
    high = (np.array([0.5, 2.5]), np.array([[2.0], [4.0]]))  # at KL 2: 2 + 0.75 * 2 = 3.5
    short = (np.array([0.1, 0.2]), np.array([[9.0], [9.0]]))  # never reaches KL 2
    best = envelope_at_kl([low, high, short], 2.0)
    assert best.values.tolist() == [3.5] and best.setting == 1 and (best.kl_low, best.kl_high) == (0.5, 2.5)
    assert envelope_at_kl([short], 2.0) is None


def test_best_under_budget():
    kl, score = np.array([1.0, 2.0, 5.0, 3.0]), np.array([0.1, 0.3, 0.9, 0.2])
    assert best_under_budget(kl, score, 4.0) == 1  # 0.9 is at KL 5, over the budget
    assert best_under_budget(kl, score, 0.5) is None


def test_gao_fits_recover_planted_coefficients_and_peaks():
    kl = np.array([0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
    d = np.sqrt(kl)
    bon = gao_fit(kl, d * (0.3 - 0.05 * d), "bon")
    assert (bon["alpha"], bon["beta"], bon["r2"]) == pytest.approx((0.3, 0.05, 1.0))
    assert bon["peak_kl"] == pytest.approx((0.3 / 0.1) ** 2)  # d* = alpha / (2 beta) = 3, KL* = 9
    assert bon["peak_reward"] == pytest.approx(0.3 * 3 - 0.05 * 9)  # 0.45
    rl = gao_fit(kl, d * (0.2 - 0.1 * np.log(d)), "rl")
    assert (rl["alpha"], rl["beta"]) == pytest.approx((0.2, 0.1))
    assert rl["peak_kl"] == pytest.approx(math.exp(2 * (0.2 / 0.1 - 1)))  # d* = e^(alpha/beta - 1) = e
    assert rl["peak_reward"] == pytest.approx(0.1 * math.e)  # R* = beta d*
    assert gao_curve(0.2, 0.1, "rl", np.array([math.e]))[0] == pytest.approx(0.1 * math.e)
    assert math.isnan(gao_fit(kl[:2], kl[:2], "rl")["alpha"])  # too few points to fit two coefficients


def test_fitted_peaks_far_past_the_measured_kl_are_not_shown():
    """R = d (1 - 0.5 d) (best-of-n form) peaks at d = 1, KL 1, R 0.5: shown when measured up to KL 4; measured only
    up to KL 0.3 the peak is > 2x past the data, an extrapolation: blank, and ``peak`` says so."""
    import pandas as pd

    from prefopt.bench.report.curves import Arrays
    from prefopt.bench.report.tables import fits_table

    arrays = Arrays(np.array([0]), [0], {0: np.zeros((1, 6))}, {}, [])  # start gold 0
    for top, note in ((4.0, "within the measured KL"), (0.3, "beyond 2x the measured KL: not shown")):
        kl = np.linspace(0.05, top, 6)
        d = np.sqrt(kl)
        frontier = pd.DataFrame({"label": "best_of_n", "value": None, "kl": kl, "gold": d * (1 - 0.5 * d)})
        row = fits_table(frontier, arrays).iloc[0]
        assert row["peak"] == note and row["max measured kl"] == pytest.approx(top)
        if top > 1:
            assert (row["peak_kl"], row["peak_reward"]) == pytest.approx((1.0, 0.5))
        else:
            assert np.isnan(row["peak_kl"]) and np.isnan(row["peak_reward"])
