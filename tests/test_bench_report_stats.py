"""prefopt.bench.report.stats / tdist / coverage: hand-checked numbers, and the measured coverage of the intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prefopt.bench.report.coverage import SHARES, interval_coverage, simulate
from prefopt.bench.report.stats import holm, interval, nested_interval, variance_shares, wilson, within_slope
from prefopt.bench.report.tdist import t_cdf, t_quantile, t_two_sided_p


def test_student_t_against_printed_tables():
    # two-sided 95% critical values of Student's t (any statistics table)
    assert t_quantile(0.975, [1, 2, 3, 10, 30]).tolist() == pytest.approx([12.7062, 4.3027, 3.1824, 2.2281, 2.0423],
                                                                          abs=1e-4)
    assert float(t_quantile(0.975, 1e7)) == pytest.approx(1.95996, abs=1e-4)  # the normal limit
    assert float(t_quantile(0.025, 2)) == pytest.approx(-4.3027, abs=1e-4)
    assert float(t_cdf(1.0, 1)) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    assert float(t_cdf(0.0, 5)) == 0.5
    assert float(t_two_sided_p(2.2281389, 10)) == pytest.approx(0.05, abs=1e-6)
    for df in (2, 11, 127):  # the quantile inverts the CDF
        for q in (0.6, 0.975, 1 - 1e-8):
            assert float(t_cdf(t_quantile(q, df), df)) == pytest.approx(q, abs=1e-9)


def test_interval_of_a_small_table_by_hand():
    table = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # 3 draws x 2 prompts
    # draw means 1.5, 3.5, 5.5: standard deviation 2, se = 2 / sqrt(3); half width = 4.302653 * 2 / sqrt(3) = 4.9683
    result = interval(table)
    assert result.mean == 3.5 and result.se == pytest.approx(2 / math.sqrt(3))
    assert (result.lo, result.hi) == pytest.approx((3.5 - 4.9683, 3.5 + 4.9683), abs=1e-4)
    # t = 3.5 / 1.1547 = 3.0311 on 2 df: two-sided p = 0.0938 (a t table: t(0.95, 2) = 2.92, t(0.975, 2) = 4.30)
    assert result.p == pytest.approx(0.0938, abs=1e-4)
    shifted = interval(table - 3.5 + 4.9683)  # a mean equal to the half width: the interval touches 0, p = 0.05
    assert shifted.lo == pytest.approx(0.0, abs=1e-4) and shifted.p == pytest.approx(0.05, abs=1e-4)
    # [draws, seeds, prompts]: each draw's mean over its seeds (a failed seed, NaN, left out)
    cells = np.array([[[1.0, 2.0], [np.nan, np.nan]], [[3.0, 4.0], [3.0, 4.0]], [[4.0, 6.0], [6.0, 6.0]]])
    assert nested_interval(cells).lo == pytest.approx(result.lo, abs=1e-4)
    # one draw: the seeds are the unit (and the interval says so); one unit: no interval
    one_draw = nested_interval(table[None])
    assert one_draw.unit == "seeds" and (one_draw.lo, one_draw.hi) == pytest.approx((result.lo, result.hi))
    assert math.isnan(interval(np.array([[1.0, 2.0]])).lo)


def test_holm_step_down_by_hand():
    # sorted 0.01 * 4 = 0.04; 0.03 * 3 = 0.09; 0.04 * 2 = 0.08 -> running max 0.09; 0.5 * 1 = 0.5; NaN untested
    adjusted = holm([0.01, 0.04, 0.03, float("nan"), 0.5])
    assert adjusted[:3] == pytest.approx([0.04, 0.09, 0.09]) and math.isnan(adjusted[3]) and adjusted[4] == 0.5


def test_variance_shares_find_the_level_that_varies():
    draws, seeds, prompts = np.meshgrid(np.arange(3), np.arange(4), np.arange(8), indexing="ij")
    assert variance_shares(draws.astype(float))["draw"] == pytest.approx(1.0)
    seed_effect = np.where(seeds % 2 == 0, 1.0, -1.0)  # every draw's seeds average to 0
    assert variance_shares(seed_effect)["seed"] == pytest.approx(1.0)
    noise = np.where((seeds + prompts) % 2 == 0, 1.0, -1.0)  # every cell, draw and prompt averages it to 0
    assert variance_shares(noise)["prompt"] == pytest.approx(1.0)
    mixed = variance_shares(draws + seed_effect + noise)
    assert sum(mixed.values()) == pytest.approx(1.0) and min(mixed.values()) > 0
    # the prompts' own effects are fixed (the estimand is on the pinned prompts): they add no share
    assert variance_shares(draws + seed_effect + noise + np.sin(prompts)) == pytest.approx(mixed)


def test_wilson_and_within_prompt_slope_by_hand():
    assert wilson(50, 100) == pytest.approx((0.40383, 0.59617), abs=1e-5)  # the textbook 50/100 case
    # within groups y rises 2 per unit of x; between groups the level differs by 10 (ignored by the within slope)
    x, y = np.array([1, 2, 3, 1, 2, 3.0]), np.array([2, 4, 6, 12, 14, 16.0])
    assert within_slope(x, y, np.array(list("aaabbb"))) == pytest.approx(2.0)


@pytest.mark.parametrize("shares", SHARES)
@pytest.mark.parametrize("heavy_seeds", [False, True])
def test_interval_coverage_measured_on_bench_shaped_data(shares, heavy_seeds):
    """3 draws x 4 seeds x 128 prompts with a known truth: the 95% interval must cover it in 93-97% of data sets
    (seeds carrying 0.5-0.97 of the variance, draws up to 0.4; heavy-tailed seeds: a collapsing seed)."""
    rng = np.random.default_rng(1)
    coverage, _ = interval_coverage(*simulate(shares, 3000, rng, heavy_seeds=heavy_seeds))
    assert 0.93 <= coverage <= 0.97, (shares, heavy_seeds, coverage)
