"""The report's figures (matplotlib, Agg): true reward against KL per setting, and the training curves."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from prefopt.bench.report.frontier import gao_curve


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(path: Path, frontier: pd.DataFrame, fits: pd.DataFrame, start_gold: float, reward_name: str,
                  kl_levels: list[float], budget: float) -> None:
    """One panel per trained label (small multiples, shared axes): one line per setting through its checkpoints'
    means, Gao et al.'s fitted curve of each setting dashed; best-of-n by the proxy and by the true reward in every
    panel as references (grey); the start; matched-KL levels dotted, the budget dashed; x on a sqrt scale (Gao et
    al.'s d = sqrt(KL))."""
    plt = _pyplot()
    groups = dict(list(frontier.groupby("label", sort=False)))
    references = {label: group for label, group in groups.items() if str(label).startswith("best_of_n")}
    panels = [label for label in groups if label not in references] or list(references)
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows + 0.6), sharex=True, sharey=True,
                             squeeze=False)
    kl_max = float(np.nanmax(frontier["kl"])) if len(frontier) else 1.0
    for ax, label in zip(axes.flat, panels):
        for ref, style in zip(references, ("-", "--")):
            curve = references[ref].sort_values("step")
            ax.plot(curve["kl"], curve["gold"], ls=style, color="grey", lw=1.0, label=ref)
        settings = list(groups[label].groupby("value", dropna=False, sort=True))
        shades = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, max(len(settings), 1)))
        for color, (value, curve) in zip(shades, settings):
            curve = curve.sort_values("step")
            name = f"{value:g}" if isinstance(value, (int, float)) and not pd.isna(value) else str(value)
            ax.plot(curve["kl"], curve["gold"], marker="o", ms=2.5, lw=1.1, color=color, label=name)
            fit = fits[(fits["label"] == label) & ((fits["value"] == value) | (pd.isna(value) & fits["value"].isna()))]
            if not fit.empty and np.isfinite(fit.iloc[0]["alpha"]):
                d = np.linspace(0, math.sqrt(max(curve["kl"].max(), 1e-6)), 60)
                form = "bon" if str(label).startswith("best_of_n") else "rl"
                ax.plot(d ** 2, start_gold + gao_curve(fit.iloc[0]["alpha"], fit.iloc[0]["beta"], form, d), ls="--",
                        lw=0.7, color=color, alpha=0.7)
        if np.isfinite(start_gold):
            ax.scatter([0], [start_gold], marker="*", s=60, color="black", zorder=5)
        for k in kl_levels:
            ax.axvline(k, color="grey", ls=":", lw=0.6)
        if np.isfinite(budget):
            ax.axvline(budget, color="black", ls="--", lw=0.7)
        ax.set_title(str(label), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=5.5, loc="lower right")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    ax = axes.flat[0]
    ax.set_xscale("function", functions=(lambda x: np.sqrt(np.maximum(x, 0)), np.square))
    ax.set_xlim(0, kl_max * 1.05)
    ax.set_xticks([t for t in (0, 1, 2, 5, 10, 20, 40, 100, 200, 500) if t <= kl_max * 1.05])
    fig.supxlabel("KL(policy || start), nats per response, sqrt scale (best-of-n: log n - (n-1)/n)", fontsize=9)
    fig.supylabel(f"{reward_name} on eval prompts (mean over draws x seeds)", fontsize=9)
    fig.suptitle("True reward vs KL: one line per setting (its knob value) through its checkpoints; dashed: Gao et "
                 f"al. fit; grey: best-of-n by the proxy (solid) / the true reward (dashed); star: the start; dotted: "
                 f"matched KL levels; black dashed: the budget {budget:g}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CURVE_KEYS = ["reward/total", "reward/score", "rewards/margin", "rewards/accuracy", "train/grad_norm"]


def plot_training_curves(path: Path, curves: dict[str, list[tuple[str, pd.DataFrame]]]) -> None:
    """Per label: train/loss and its main progress metric against the step, one line per run (metrics.jsonl)."""
    plt = _pyplot()
    labels = list(curves)
    fig, axes = plt.subplots(len(labels), 2, figsize=(10, 2.4 * max(len(labels), 1)), squeeze=False)
    for row, label in enumerate(labels):
        for run_id, frame in curves[label]:
            name = run_id.split("/", 1)[-1]
            if "train/loss" in frame and frame["train/loss"].notna().any():
                rows = frame[frame["train/loss"].notna()]
                axes[row, 0].plot(rows["step"], rows["train/loss"], lw=0.9, label=name)
            key = next((k for k in CURVE_KEYS if k in frame and frame[k].notna().any()), None)
            if key is not None:
                rows = frame[frame[key].notna()]
                axes[row, 1].plot(rows["step"], rows[key], lw=0.9, label=name)
                axes[row, 1].set_ylabel(key, fontsize=8)
        axes[row, 0].set_ylabel(f"{label}\ntrain/loss", fontsize=8)
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        if axes[row, 0].lines:
            axes[row, 0].legend(fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
