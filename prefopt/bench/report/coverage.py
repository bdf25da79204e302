"""The measured coverage of the report's intervals (prefopt.bench.report.stats) on simulated bench-shaped data.

Data with a known mean mu = 0 and the bench's nesting: y[d, s, i] = a_d + b_ds + c_i + e_dsi for D world draws,
S seeds per draw and P prompts crossed with both. The variance of the grand mean is split into the stated shares:
draw (a), seed (b) and prompt (c, shared by every draw and seed, and e, the per-sample noise, half each). Seeds may
be heavy-tailed (Student t with 3 df, scaled to the same variance: a seed that collapses). The coverage of a
procedure is the fraction of simulated data sets whose 95% interval contains mu.

Two procedures are measured side by side: the report's interval (draws as units with the crossed prompt component,
stats.interval on the seed means) and the hierarchical percentile bootstrap a reviewer might expect (draws with
replacement, then seeds within each drawn draw, then prompts: one resample of prompt indices shared by every
cell, since prompts are crossed), vectorised, ``resamples`` replicates.

``python -m prefopt.bench.report.coverage`` prints both over the grid of shares in ``SHARES``.
"""

from __future__ import annotations

import argparse

import numpy as np

from prefopt.bench.report.stats import LEVEL, components, half_width

# (draw, seed, prompt) shares of the variance of the grand mean; seeds carry 0.5-0.97 of it on the bench today
SHARES = [(0.0, 0.97, 0.03), (0.0, 0.75, 0.25), (0.0, 0.5, 0.5), (0.2, 0.6, 0.2), (0.4, 0.5, 0.1)]


def simulate(shares: tuple[float, float, float], reps: int, rng: np.random.Generator, draws: int = 3,
             seeds: int = 4, prompts: int = 128, heavy_seeds: bool = False) -> np.ndarray:
    """[reps, draws, seeds, prompts] data of mean 0 whose grand mean has variance 1, split as ``shares``."""
    draw, seed, prompt = shares
    scale = {"a": np.sqrt(draw * draws), "b": np.sqrt(seed * draws * seeds),
             "c": np.sqrt(prompt / 2 * prompts), "e": np.sqrt(prompt / 2 * draws * seeds * prompts)}
    a = rng.standard_normal((reps, draws, 1, 1)) * scale["a"]
    b = (rng.standard_t(3, (reps, draws, seeds, 1)) / np.sqrt(3.0) if heavy_seeds
         else rng.standard_normal((reps, draws, seeds, 1))) * scale["b"]
    c = rng.standard_normal((reps, 1, 1, prompts)) * scale["c"]
    e = rng.standard_normal((reps, draws, seeds, prompts)) * scale["e"]
    return a + b + c + e


def interval_coverage(data: np.ndarray, mu: float = 0.0) -> tuple[float, float]:
    """(coverage, median width) of the report's interval over the simulated data sets (one batch call)."""
    table = data.mean(2)  # seed means: [reps, draws, prompts]
    v_draw, v_prompt = components(table)
    units, prompts = table.shape[-2:]
    width = np.array([half_width(vd, vp, units, prompts) for vd, vp in zip(v_draw, v_prompt)])
    mean = table.mean((-2, -1))
    return float((np.abs(mean - mu) <= width).mean()), float(np.median(2 * width))


def hierarchical_bootstrap(cells: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Replicate grand means of a [draws, seeds, prompts] array: draws with replacement, seeds with replacement
    within each drawn draw, prompt indices with replacement (one set per replicate, crossed)."""
    draws, seeds, prompts = cells.shape
    weights = rng.multinomial(prompts, np.full(prompts, 1.0 / prompts), size=resamples).T / prompts  # [P, B]
    cell_means = (cells.reshape(draws * seeds, prompts) @ weights).reshape(draws, seeds, resamples)
    d = rng.integers(0, draws, (resamples, draws))
    s = rng.integers(0, seeds, (resamples, draws, seeds))
    return cell_means[d[:, :, None], s, np.arange(resamples)[:, None, None]].mean((1, 2))


def bootstrap_coverage(data: np.ndarray, resamples: int, rng: np.random.Generator, mu: float = 0.0) -> tuple[float, float]:
    """(coverage, median width) of the hierarchical percentile bootstrap's 95% interval."""
    hits, widths = [], []
    tail = 100 * (1 - LEVEL) / 2
    for cells in data:
        lo, hi = np.percentile(hierarchical_bootstrap(cells, resamples, rng), [tail, 100 - tail])
        hits.append(lo <= mu <= hi)
        widths.append(hi - lo)
    return float(np.mean(hits)), float(np.median(widths))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=4000, help="simulated data sets per cell (report's interval)")
    parser.add_argument("--bootstrap-reps", type=int, default=400, help="simulated data sets per cell (bootstrap)")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap replicates per data set")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    shape = {"draws": args.draws, "seeds": args.seeds, "prompts": args.prompts}
    print(f"nominal {LEVEL:.2f}; {args.draws} draws x {args.seeds} seeds x {args.prompts} prompts; width in units"
          f" of the true standard error (a z interval would be {2 * 1.959964:.2f})")
    print("| draw / seed / prompt shares | seeds | report interval: coverage | width "
          f"| hierarchical percentile bootstrap ({args.resamples} resamples): coverage | width |")
    print("|---|---|---|---|---|---|")
    for shares in SHARES:
        for heavy in (False, True):
            coverage, width = interval_coverage(simulate(shares, args.reps, rng, heavy_seeds=heavy, **shape))
            boot = bootstrap_coverage(simulate(shares, args.bootstrap_reps, rng, heavy_seeds=heavy, **shape),
                                      args.resamples, rng)
            print(f"| {' / '.join(f'{x:.2f}' for x in shares)} | {'t3' if heavy else 'normal'} | {coverage:.3f} |"
                  f" {width:.2f} | {boot[0]:.3f} | {boot[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
