"""The measured coverage of the report's intervals (prefopt.bench.report.stats) on simulated bench-shaped data.

Data with the bench's nesting and a known truth: y[d, s, i] = mu + c_i + a_d + b_ds + e_dsi for D world draws,
S seeds per draw and P pinned prompts (c_i: the prompt's effect, fixed like the bench's pinned eval prompts;
a: draw, b: seed, e: per-sample noise). The variance of the grand mean is split into the stated shares of draws,
seeds and prompts; the prompt share is split half between c (prompts differ) and e (samples differ). Seeds may be
heavy-tailed (Student t with 3 df, scaled to the same variance: a seed that collapses). The truth is the
estimand of the report's interval, mu + mean_i c_i (the expectation over draws and seeds on these prompts); the
coverage of a procedure is the fraction of simulated data sets whose 95% interval contains it.

Measured side by side: the report's interval (stats.nested_interval: t on the draw means); the same interval
judged against mu alone (what it covers if the target were new prompts); and the hierarchical percentile bootstrap
a reviewer might expect (draws with replacement, seeds with replacement within each drawn draw, prompts with
replacement within each drawn seed; ``resamples`` replicates, vectorised).

``python -m prefopt.bench.report.coverage`` prints the three over the grid ``SHARES`` x {normal, heavy} seeds.
"""

from __future__ import annotations

import argparse

import numpy as np

from prefopt.bench.report.stats import LEVEL, t_critical

# (draw, seed, prompt) shares of the variance of the grand mean; seeds carry 0.5-0.97 of it on the bench today
SHARES = [(0.0, 0.97, 0.03), (0.0, 0.75, 0.25), (0.0, 0.5, 0.5), (0.2, 0.6, 0.2), (0.4, 0.5, 0.1)]


def simulate(shares: tuple[float, float, float], reps: int, rng: np.random.Generator, draws: int = 3,
             seeds: int = 4, prompts: int = 128, heavy_seeds: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """([reps, draws, seeds, prompts] data whose grand mean has variance 1 split as ``shares``, [reps] truth
    mu + mean_i c_i with mu = 0)."""
    draw, seed, prompt = shares
    c = rng.standard_normal((reps, 1, 1, prompts)) * np.sqrt(prompt / 2 * prompts)
    a = rng.standard_normal((reps, draws, 1, 1)) * np.sqrt(draw * draws)
    b = (rng.standard_t(3, (reps, draws, seeds, 1)) / np.sqrt(3.0) if heavy_seeds
         else rng.standard_normal((reps, draws, seeds, 1))) * np.sqrt(seed * draws * seeds)
    e = rng.standard_normal((reps, draws, seeds, prompts)) * np.sqrt(prompt / 2 * draws * seeds * prompts)
    return c + a + b + e, c.mean((1, 2, 3))


def interval_coverage(data: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(coverage, median width) of stats.nested_interval over the data sets (vectorised: the same formula)."""
    draw_means = data.mean((2, 3))  # [reps, draws]
    draws = draw_means.shape[1]
    mean = draw_means.mean(1)
    width = t_critical(draws - 1) * draw_means.std(axis=1, ddof=1) / np.sqrt(draws)
    return float((np.abs(mean - truth) <= width).mean()), float(np.median(2 * width))


def hierarchical_bootstrap(cells: np.ndarray, resamples: int, rng: np.random.Generator,
                           chunk: int = 2000) -> np.ndarray:
    """Replicate grand means of a [draws, seeds, prompts] array: draws with replacement, seeds with replacement
    within each drawn draw, prompts with replacement within each drawn seed (in chunks of replicates)."""
    draws, seeds, prompts = cells.shape
    flat = cells.reshape(draws * seeds, prompts)
    out = []
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        d = rng.integers(0, draws, (count, draws, 1))
        cell = d * seeds + rng.integers(0, seeds, (count, draws, seeds))  # [count, draws, seeds] cell indices
        picks = rng.integers(0, prompts, (count, draws, seeds, prompts), dtype=np.int32)
        out.append(flat[cell[..., None], picks].mean((1, 2, 3)))
    return np.concatenate(out)


def bootstrap_coverage(data: np.ndarray, truth: np.ndarray, resamples: int,
                       rng: np.random.Generator) -> tuple[float, float]:
    """(coverage, median width) of the hierarchical percentile bootstrap's 95% interval."""
    tail = 100 * (1 - LEVEL) / 2
    bounds = np.array([np.percentile(hierarchical_bootstrap(cells, resamples, rng), [tail, 100 - tail])
                       for cells in data])
    return float(((bounds[:, 0] <= truth) & (truth <= bounds[:, 1])).mean()), float(np.median(np.diff(bounds, 1)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20000, help="simulated data sets per cell (report's interval)")
    parser.add_argument("--bootstrap-reps", type=int, default=400, help="simulated data sets per cell (bootstrap)")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap replicates per data set")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    shape = {"draws": args.draws, "seeds": args.seeds, "prompts": args.prompts}
    print(f"nominal {LEVEL:.2f}; {args.draws} draws x {args.seeds} seeds x {args.prompts} prompts; widths in units of"
          f" the standard error of the grand mean (a z interval with the true variance: {2 * 1.959964:.2f})\n")
    print(f"| shares draw / seed / prompt | seeds | report interval ({args.reps} sets): coverage | width "
          f"| same, target new prompts | hierarchical percentile bootstrap ({args.bootstrap_reps} sets x "
          f"{args.resamples} resamples): coverage | width |")
    print("|---|---|---|---|---|---|---|")
    for shares in SHARES:
        for heavy in (False, True):
            data, truth = simulate(shares, args.reps, rng, heavy_seeds=heavy, **shape)
            coverage, width = interval_coverage(data, truth)
            unconditional, _ = interval_coverage(data, np.zeros_like(truth))
            data, truth = simulate(shares, args.bootstrap_reps, rng, heavy_seeds=heavy, **shape)
            boot = bootstrap_coverage(data, truth, args.resamples, rng)
            print(f"| {' / '.join(f'{x:.2f}' for x in shares)} | {'t3' if heavy else 'normal'} | {coverage:.3f} |"
                  f" {width:.2f} | {unconditional:.3f} | {boot[0]:.3f} | {boot[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
