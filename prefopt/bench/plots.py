"""The bench's figures (matplotlib): gold reward against KL (frontiers with Gao fits) and against FLOPs, and
the training curves read from each run's metrics.jsonl."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from prefopt.bench.frontier import BON, gao_curve


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontiers(path: Path, frontier: pd.DataFrame, fits: pd.DataFrame, start_gold: float, reward_name: str,
                   kl_levels: list[float]) -> None:
    """Seed-mean points (95% bootstrap bars) of every (label, knob value, step), a line from the start through each
    knob value's checkpoints in training order, and each label's fitted Gao curve (dashed); x on a sqrt scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.0, 5.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*X"
    for index, (label, group) in enumerate(frontier.groupby("label", sort=False)):
        color = colors[index % len(colors)]
        for v_index, (value, curve) in enumerate(group.groupby("value", dropna=False, sort=True)):
            curve = curve.sort_values(["step", "value"])  # along training (best-of-n: along n)
            xs = np.concatenate([[0.0], curve["kl"].to_numpy()]) if label != BON else curve["kl"].to_numpy()
            ys = np.concatenate([[start_gold], curve["gold"].to_numpy()]) if label != BON else curve["gold"].to_numpy()
            ax.plot(xs, ys, color=color, lw=1, alpha=0.6)
            yerr = np.vstack([curve["gold"] - curve["gold_lo"], curve["gold_hi"] - curve["gold"]]) \
                if "gold_lo" in curve and curve["gold_lo"].notna().all() else None
            ax.errorbar(curve["kl"], curve["gold"], yerr=yerr, fmt=markers[v_index % len(markers)], color=color,
                        ms=4, capsize=2, lw=0.8, label=f"{label}" if v_index == 0 else None)
        fit = fits[fits["label"] == label]
        if not fit.empty and np.isfinite(fit.iloc[0]["a"]):
            kl_max = max(group["kl"].max(), 1e-6)
            d = np.linspace(0, math.sqrt(kl_max), 60)
            form = "bon" if label == BON else "rl"
            ax.plot(d ** 2, start_gold + gao_curve(fit.iloc[0]["a"], fit.iloc[0]["b"], form, d), ls="--",
                    color=color, lw=1)
    ax.scatter([0], [start_gold], marker="*", s=160, color="black", label="start", zorder=5)
    for k in kl_levels:
        ax.axvline(k, color="grey", ls=":", lw=0.8)
    ax.set_xscale("function", functions=(lambda x: np.sqrt(np.maximum(x, 0)), np.square))  # Gao et al.'s d axis
    kl_max = float(frontier["kl"].max())
    ax.set_xlim(0, kl_max * 1.05)
    ax.set_xticks([t for t in (0, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500) if t <= kl_max * 1.05])
    ax.set_xlabel("KL(pi || pi_start), nats per sequence, on a sqrt scale (best-of-n: analytic log n - (n-1)/n)")
    ax.set_ylabel(f"{reward_name} on eval prompts")
    ax.set_title("Gold reward vs KL: knob values x checkpoints (markers: knob value), dashed: Gao fit; "
                 "bars: 95% bootstrap over seeds", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_compute(path: Path, curves: pd.DataFrame, start_gold: float, reward_name: str) -> None:
    """Gold reward against estimated training FLOPs along each (label, knob value)'s checkpoints."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (label, group) in enumerate(curves.groupby("label", sort=False)):
        for v_index, (value, curve) in enumerate(group.groupby("value", dropna=False)):
            curve = curve.sort_values("flops")
            ax.plot(np.concatenate([[0.0], curve["flops"]]), np.concatenate([[start_gold], curve["gold"]]),
                    marker="o", ms=3, color=colors[index % len(colors)], lw=1, alpha=0.8,
                    label=label if v_index == 0 else None)
    ax.set_xlabel("estimated training FLOPs (per run)")
    ax.set_ylabel(f"{reward_name} on eval prompts")
    ax.set_title("Compute-matched view: gold reward vs training FLOPs (seed means)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


CURVE_KEYS = ["reward/total", "reward/score", "rewards/margin", "rewards/accuracy", "train/grad_norm"]


def plot_training_curves(path: Path, runs: dict[str, dict[int, Path]]) -> None:
    """Per algorithm: train/loss and its main progress metric against the step, one line per seed."""
    plt = _pyplot()
    from prefopt.metrics import read_metrics

    labels = list(runs)
    fig, axes = plt.subplots(len(labels), 2, figsize=(10, 2.6 * max(len(labels), 1)), squeeze=False)
    for row, label in enumerate(labels):
        for seed, run_dir in sorted(runs[label].items()):
            frame = read_metrics(run_dir / "metrics.jsonl")
            frame = frame[frame["train/loss"].notna()] if "train/loss" in frame else frame.iloc[0:0]
            if frame.empty:
                continue
            axes[row, 0].plot(frame["step"], frame["train/loss"], label=f"seed {seed}", lw=1)
            key = next((k for k in CURVE_KEYS if k in frame and frame[k].notna().any()), None)
            if key is not None:
                axes[row, 1].plot(frame["step"], frame[key], label=f"seed {seed}", lw=1)
                axes[row, 1].set_ylabel(key, fontsize=8)
        axes[row, 0].set_ylabel(f"{label}\ntrain/loss", fontsize=8)
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        axes[row, 0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
