"""Frontiers, matched-KL paired comparisons, bootstrap intervals and Gao et al.'s functional forms.

Everything here is a function of the per-run logs (prefopt.bench.logs reads them into one per-prompt frame):
one row per (label, knob value, seed, step, eval prompt i) with the gold score and the KL of that prompt's sample.

* A **point** is one (label, value, step, seed): the means over the eval prompts. Its seed-mean carries a 95%
  percentile bootstrap interval over seeds.
* **Gold at KL k** (per label and seed): all of the label's points (every knob value and checkpoint, plus the
  start at KL 0) sorted by mean KL; the per-prompt gold vector is interpolated linearly between the two points
  whose mean KL brackets k (the same weights for every prompt). Undefined when a seed never reaches k. The
  verdict table shows the seed-mean KLs of those two points ("A between KL"): an interval from 0 (the start) to
  a far first checkpoint is a chord, not a measured frontier.
  Best-of-n is a label like the others, its points at the analytic KL log n - (n - 1) / n.
* **Paired comparison** A vs B: d[s, i] = g_A[s, i] - g_B[s, i] on the same eval prompt i, sampled with the same
  seed, for training seed s; the 95% interval and the two-sided p-value come from a bootstrap that resamples
  seeds and prompts (with replacement, independently); verdict ``better`` / ``worse`` when the interval excludes
  0, else ``inconclusive``. No correction for the number of comparisons.
* **Gao et al. 2022** (arXiv 2210.10760, eq. 1-2), d = sqrt(KL), R = gold - gold(start):
  best-of-n R = d (a - b d); RL R = d (a - b log d), fitted by least squares over the seed-mean points.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

BON = "best_of_n"


def bon_kl(n: int) -> float:
    """KL(best-of-n || start) = log n - (n - 1) / n (Stiennon et al. 2020, appendix)."""
    return math.log(n) - (n - 1) / n


def best_of_n_rows(draws: pd.DataFrame, ns: list[int]) -> pd.DataFrame:
    """Per (seed, n, prompt i): the gold of the first-n draws' argmax under the proxy (first draw on ties)."""
    out = []
    for (seed, i), group in draws.sort_values("j").groupby(["seed", "i"], sort=True):
        proxy, gold, length = group["proxy"].to_numpy(), group["gold"].to_numpy(), group["length"].to_numpy()
        for n in ns:
            best = int(np.argmax(proxy[:n]))
            out.append({"label": BON, "value": float(n), "seed": int(seed), "step": 0, "i": int(i),
                        "gold": float(gold[best]), "proxy": float(proxy[best]), "kl": bon_kl(n),
                        "length": float(length[best])})
    return pd.DataFrame(out)


def bootstrap_mean_ci(values: np.ndarray, resamples: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values`` (NaN for fewer than 2)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def seed_points(prompts: pd.DataFrame) -> pd.DataFrame:
    """One row per (label, value, step, seed): means over the prompts of every per-prompt column."""
    columns = [c for c in ("gold", "proxy", "kl", "length", "entropy") if c in prompts]
    return prompts.groupby(["label", "value", "step", "seed"], dropna=False)[columns].mean().reset_index()


def frontier_table(points: pd.DataFrame, resamples: int) -> pd.DataFrame:
    """Seed means of every point with 95% bootstrap intervals over seeds (gold and KL)."""
    out = []
    for (label, value, step), group in points.groupby(["label", "value", "step"], dropna=False, sort=False):
        row = {"label": label, "value": value, "step": step, "n_seeds": len(group)}
        for column in ("gold", "kl", "proxy", "length", "entropy"):
            if column in group and group[column].notna().any():
                row[column] = float(group[column].mean())
                if column in ("gold", "kl"):
                    row[f"{column}_lo"], row[f"{column}_hi"] = bootstrap_mean_ci(group[column].to_numpy(), resamples)
        out.append(row)
    return pd.DataFrame(out)


def gold_matrix_at_kl(prompts: pd.DataFrame, label: str, k: float, start: pd.DataFrame | None,
                      brackets: list[tuple[float, float]] | None = None) -> np.ndarray | None:
    """[seeds, prompts] gold at KL k (module docstring), seeds in sorted order; None if a seed misses k.
    ``brackets`` (when given) receives each seed's (lower, upper) KL of the two points interpolated between."""
    rows = []
    for seed, group in prompts[prompts["label"] == label].groupby("seed", sort=True):
        curves = [(float(g["kl"].mean()), g.sort_values("i")["gold"].to_numpy())
                  for _, g in group.groupby(["value", "step"], dropna=False)]
        if start is not None and label != BON:
            curves.append((0.0, start.sort_values("i")["gold"].to_numpy()))
        curves.sort(key=lambda c: c[0])
        kls = [c[0] for c in curves]
        if k > kls[-1] or k < kls[0]:
            return None
        j = max(idx for idx, value in enumerate(kls) if value <= k)
        if brackets is not None:
            brackets.append((kls[j], kls[min(j + 1, len(kls) - 1)]))
        if j == len(curves) - 1 or kls[j + 1] == kls[j]:
            rows.append(curves[j][1])
            continue
        w = (k - kls[j]) / (kls[j + 1] - kls[j])
        rows.append((1 - w) * curves[j][1] + w * curves[j + 1][1])
    return np.vstack(rows) if rows else None


def _between(brackets: list[tuple[float, float]]) -> str:
    """Seed-mean KLs of the two measured points a matched-KL value was interpolated between ("0.0-6.9")."""
    if not brackets:
        return ""
    lower, upper = np.mean([b[0] for b in brackets]), np.mean([b[1] for b in brackets])
    return f"{lower:.1f}-{upper:.1f}"


def paired(diff: np.ndarray, resamples: int, seed: int = 0) -> dict[str, float]:
    """Mean of d[s, i], its 95% seeds x prompts bootstrap interval and two-sided bootstrap p-value."""
    rng = np.random.default_rng(seed)
    s, p = diff.shape
    si = rng.integers(0, s, size=(resamples, s))
    pi = rng.integers(0, p, size=(resamples, p))
    stats = np.array([diff[si[b]][:, pi[b]].mean() for b in range(resamples)])
    p_value = min(1.0, 2 * min((stats <= 0).mean(), (stats >= 0).mean()))
    return {"diff": float(diff.mean()), "lo": float(np.percentile(stats, 2.5)),
            "hi": float(np.percentile(stats, 97.5)), "p": max(p_value, 1.0 / resamples)}


def verdict(result: dict[str, float]) -> str:
    return "better" if result["lo"] > 0 else "worse" if result["hi"] < 0 else "inconclusive"


def best_values(points: pd.DataFrame, val_points: pd.DataFrame) -> dict[str, Any]:
    """Per algorithm label: the knob value whose last step has the highest seed-mean val gold reward."""
    out = {}
    for label, group in val_points.groupby("label"):
        means = group.groupby("value", dropna=False)["gold"].mean()
        out[label] = means.idxmax()
    return out


def final_matrix(prompts: pd.DataFrame, label: str, value: Any) -> np.ndarray:
    """[seeds, prompts] gold at the last step of (label, value)."""
    rows = prompts[(prompts["label"] == label) & ((prompts["value"] == value) | (pd.isna(value) & prompts["value"].isna()))]
    last = rows[rows["step"] == rows["step"].max()]
    return np.vstack([g.sort_values("i")["gold"].to_numpy() for _, g in last.groupby("seed", sort=True)])


def verdict_table(prompts: pd.DataFrame, start: pd.DataFrame, labels: list[str], kl_levels: list[float],
                  best: dict[str, Any], resamples: int,
                  best_label: str = "best (val-selected knob, last step)") -> pd.DataFrame:
    """Every ordered pair (A before B in ``labels``) at each KL level and at the best points."""
    out = []
    for a_index, a in enumerate(labels):
        for b in labels[a_index + 1:]:
            for k in kl_levels:
                ba, bb = [], []
                ga, gb = gold_matrix_at_kl(prompts, a, k, start, ba), gold_matrix_at_kl(prompts, b, k, start, bb)
                row = {"A": a, "B": b, "at": f"KL {k:g}", "A between KL": _between(ba) if ga is not None else "",
                       "B between KL": _between(bb) if gb is not None else ""}
                if ga is None or gb is None or ga.shape != gb.shape:
                    missing = [x for x, g in ((a, ga), (b, gb)) if g is None]
                    out.append({**row, "verdict": f"n/a (not reached by {' and '.join(missing) or 'every seed'})"})
                    continue
                result = paired(ga - gb, resamples)
                out.append({**row, **result, "verdict": verdict(result)})
            if a in best and b in best:
                ga, gb = final_matrix(prompts, a, best[a]), final_matrix(prompts, b, best[b])
                if ga.shape == gb.shape:
                    result = paired(ga - gb, resamples)
                    out.append({"A": a, "B": b, "at": best_label, **result,
                                "verdict": verdict(result)})
    return pd.DataFrame(out)


def gao_fit(points: pd.DataFrame, start_gold: float, form: str) -> dict[str, float]:
    """Least-squares a, b of R = d (a - b d) (``bon``) or R = d (a - b log d) (``rl``) over seed-mean points
    with KL > 0; also the fit's R^2 and the number of points."""
    means = points.groupby(["value", "step"], dropna=False)[["gold", "kl"]].mean()
    means = means[means["kl"] > 1e-9]
    if len(means) < 2:
        return {"a": float("nan"), "b": float("nan"), "r2": float("nan"), "points": len(means)}
    d = np.sqrt(means["kl"].to_numpy())
    r = means["gold"].to_numpy() - start_gold
    design = np.stack([d, -d * d if form == "bon" else -d * np.log(d)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, r, rcond=None)
    residual = r - design @ np.array([a, b])
    total = ((r - r.mean()) ** 2).sum()
    return {"a": float(a), "b": float(b), "r2": float(1 - (residual ** 2).sum() / total) if total > 0 else float("nan"),
            "points": len(means)}


def gao_curve(a: float, b: float, form: str, d: np.ndarray) -> np.ndarray:
    return d * (a - b * d) if form == "bon" else d * (a - b * np.log(np.maximum(d, 1e-12)))
