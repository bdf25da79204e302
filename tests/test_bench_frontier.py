"""prefopt.bench.frontier (the report's maths): best-of-n KL, Gao et al.'s fits and matched-KL paired verdicts,
checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from prefopt.bench.frontier import bon_kl, gao_fit, gold_matrix_at_kl, paired, verdict
from prefopt.bench.report import markdown_table


def test_best_of_n_kl_and_gao_fits_recover_known_coefficients():
    assert bon_kl(1) == 0.0 and bon_kl(4) == pytest.approx(math.log(4) - 0.75)
    kl = np.array([0.5, 1.0, 2.0, 4.0, 8.0])
    d = np.sqrt(kl)
    for form, curve in (("bon", d * (0.3 - 0.05 * d)), ("rl", d * (0.2 - 0.1 * np.log(d)))):
        points = pd.DataFrame({"value": range(5), "step": 1, "gold": 1.0 + curve, "kl": kl})
        fit = gao_fit(points, 1.0, form)
        assert (fit["a"], fit["b"]) == pytest.approx((0.3, 0.05) if form == "bon" else (0.2, 0.1))
        assert fit["r2"] == pytest.approx(1.0)


def test_matched_kl_interpolation_and_paired_verdicts_by_hand():
    start = pd.DataFrame({"i": [0, 1], "gold": [0.0, 0.0]})
    prompts = pd.DataFrame([  # one seed, two prompts: points at KL 1 (gold 1, 3) and KL 3 (gold 2, 6)
        {"label": "a", "value": 0.1, "seed": 0, "step": 5, "i": 0, "gold": 1.0, "kl": 1.0},
        {"label": "a", "value": 0.1, "seed": 0, "step": 5, "i": 1, "gold": 3.0, "kl": 1.0},
        {"label": "a", "value": 0.1, "seed": 0, "step": 10, "i": 0, "gold": 2.0, "kl": 2.0},
        {"label": "a", "value": 0.1, "seed": 0, "step": 10, "i": 1, "gold": 6.0, "kl": 4.0}])
    assert gold_matrix_at_kl(prompts, "a", 2.0, start).tolist() == [[1.5, 4.5]]  # halfway from KL 1 to 3
    assert gold_matrix_at_kl(prompts, "a", 0.5, start).tolist() == [[0.5, 1.5]]  # halfway from the start
    assert gold_matrix_at_kl(prompts, "a", 1.5, start).tolist() == [[1.25, 3.75]]  # a quarter of the way
    assert gold_matrix_at_kl(prompts, "a", 3.5, start) is None  # never reached
    diff = np.array([[0.2, 0.3, 0.1, 0.4], [0.25, 0.2, 0.3, 0.35]])
    result = paired(diff, 500)
    assert result["diff"] == pytest.approx(diff.mean()) and result["lo"] > 0 and result["p"] == pytest.approx(1 / 500)
    assert verdict(result) == "better" and verdict(paired(-diff, 500)) == "worse"
    assert verdict(paired(np.array([[0.1, -0.1, 0.2, -0.2]]), 500)) == "inconclusive"
    assert markdown_table(pd.DataFrame({"a": [2.0]})).splitlines()[2] == "| 2.000 |"
