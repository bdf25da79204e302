"""The sanity gates a result must pass before results.md prints a verdict (DESIGN.md, "The benchmark protocol").

Blocking gates (a status other than ``pass`` replaces the verdicts with the failure and its numbers):

* ``proxy beats the prompt-blind rule`` (world): in every draw the proxy RM's accuracy on the val labels exceeds that
  of the rule that ignores the prompt (proxy.json);
* ``oracle reaches the proxy``: for every oracle label (an algorithm trained on the true reward, phase ``oracle``),
  its best point under the KL budget has a mean true reward >= that of the same algorithm trained on the proxy (the
  point estimates; the difference's interval is printed). Best-of-n by the true reward is not gated: it cannot lose.
  A world profile without oracle runs is not checked (so no verdicts); HH has no true reward to train one on;
* ``gold RM is credible`` (hh): the gold RM's held-out pair accuracy (gold.json) is >= 0.6 on >= 500 pairs and the
  lower end of its 95% interval (its ``ci95``, else Wilson's) is above every draw's proxy accuracy (proxy.json).
  Without it the HH report is a smoke test.

Flags (printed, and named on every verdict row of the label; they do not withhold the verdicts):

* ``choices interior to their grids``: the chosen learning rate and KL knob value of every label lie strictly inside
  their grids (manifest.json ``selection``): an edge pick says the grid should be extended;
* ``checkpoints``: every setting has >= 8 checkpoints, log-spaced (each step >= 1.5 x the one before, most of them);
* ``runs finished``: every planned run finished.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from prefopt.bench.report.curves import Arrays
from prefopt.bench.report.reading import RunDir
from prefopt.bench.report.stats import wilson
from prefopt.bench.report.verdicts import compare
from prefopt.bench.report.views import best_point

PASS, FAIL, FLAG, UNCHECKED, NOT_APPLICABLE = "pass", "FAIL", "flag", "not checked", "n/a"
MIN_CHECKPOINTS = 8


@dataclass
class Gate:
    name: str
    status: str
    numbers: str
    blocking: bool
    labels: tuple[str, ...] = ()  # the labels a flag names
    short: str = ""  # the flag's word on a verdict row

    @property
    def withholds(self) -> bool:
        return self.blocking and self.status not in (PASS, NOT_APPLICABLE)


def proxy_gate(data: RunDir, task: str) -> Gate:
    name = "proxy beats the prompt-blind rule (val labels)"
    if task == "hh":
        return Gate(name, NOT_APPLICABLE, "HH has no prompt-blind rule of the true reward", False)
    parts, ok = [], []
    for draw, files in sorted(data.draws.items()):
        proxy = files.get("proxy", {})
        accuracy, rule = proxy.get("val_accuracy"), proxy.get("rule_val_accuracy")
        if accuracy is None or rule is None:
            parts.append(f"draw {draw}: proxy.json lacks val_accuracy / rule_val_accuracy")
            ok.append(None)
            continue
        ok.append(accuracy > rule)
        parts.append(f"draw {draw}: proxy {accuracy:.3f} vs rule {rule:.3f} on {proxy.get('n_pairs', '?')} pairs")
    if not ok:
        return Gate(name, UNCHECKED, "no draws/draw<d>/proxy.json", True)
    status = UNCHECKED if None in ok else PASS if all(ok) else FAIL
    return Gate(name, status, "; ".join(parts), True)


def _oracle_weights(data: RunDir) -> str:
    """The weight of the true reward in each draw's oracle runs (proxy.json ``oracle_weight``), as text."""
    weights = {d: (entry.get("proxy") or {}).get("oracle_weight") for d, entry in sorted(data.draws.items())}
    known = {d: w for d, w in weights.items() if w is not None}
    return "; trained on the true reward x " + ", ".join(f"{w:.3g} (draw {d})" for d, w in known.items()) + \
        " (proxy.json oracle_weight: the proxy's units)" if known else ""


def oracle_gate(arrays: Arrays, budget: float, slope: float, chosen: dict[str, object], task: str = "world",
                weights: str = "") -> Gate:
    name = "oracle reaches the proxy (true reward >= proxy-trained, best under the KL budget)"
    oracles = [label for label in arrays.labels.values() if label.oracle_of and label.algorithm != "best_of_n"]
    if not oracles and task == "hh":
        return Gate(name, NOT_APPLICABLE, "HH has no true reward to train an oracle on (the gold RM gate stands)",
                    False)
    if not oracles:
        return Gate(name, UNCHECKED, "no oracle runs (phase oracle, reward true) in this run directory", True)
    parts, ok = [], []
    for oracle in oracles:
        twin = arrays.labels.get(oracle.oracle_of)
        if twin is None:
            parts.append(f"{oracle.name}: no finished run of {oracle.oracle_of} to compare with")
            ok.append(None)
            continue
        best_oracle, note = best_point(oracle, budget, chosen.get(oracle.name))
        best_twin, twin_note = best_point(twin, budget, chosen.get(twin.name))
        if not (best_oracle.complete and best_twin.complete):
            parts.append(f"{oracle.name} vs {twin.name}: no complete best point under KL {budget:g} "
                         f"({note}; {twin_note})")
            ok.append(None)
            continue
        row = compare(arrays, best_oracle, best_twin, slope)
        ok.append(row["gold A"] >= row["gold B"])
        parts.append(f"{oracle.name} {row['gold A']:.4f} (KL {row['A KL']}) vs {twin.name} {row['gold B']:.4f} "
                     f"(KL {row['B KL']}): diff {row['diff']:+.4f} " + (
                         f"[{row['lo']:+.4f}, {row['hi']:+.4f}]" if not np.isnan(row["lo"]) else "(no interval)"))
    status = UNCHECKED if None in ok else PASS if all(ok) else FAIL
    return Gate(name, status, "; ".join(parts) + weights, True)


def gold_gate(data: RunDir, task: str) -> Gate:
    name = "gold RM is credible (>= 0.6 on >= 500 held-out pairs, 95% lower bound above the proxy)"
    if task != "hh":
        return Gate(name, NOT_APPLICABLE, "the world's true reward is known", False)
    gold = data.gold
    accuracy, pairs = gold.get("accuracy"), gold.get("n_pairs")
    if accuracy is None or pairs is None:
        return Gate(name, FAIL, "gold.json lacks accuracy / n_pairs: the HH report is a smoke test", True)
    lo, hi = gold.get("ci95") or wilson(accuracy * pairs, int(pairs))
    proxies = {draw: files.get("proxy", {}).get("accuracy") for draw, files in sorted(data.draws.items())}
    ok = accuracy >= 0.6 and pairs >= 500 and bool(proxies) and all(p is not None and lo > p for p in proxies.values())
    text = ", ".join(f"draw {d} {p:.3f}" if p is not None else f"draw {d} ?" for d, p in proxies.items())
    return Gate(name, PASS if ok else FAIL, f"gold {accuracy:.3f} [{lo:.3f}, {hi:.3f}] on {pairs} pairs; proxy: "
                f"{text or 'no proxy.json'}", True)


def interior_gate(data: RunDir) -> Gate:
    name = "learning rate and KL knob interior to their grids"
    selection = data.manifest.get("selection")
    if not isinstance(selection, dict) or not selection:
        return Gate(name, UNCHECKED, "manifest.json has no `selection` (grids and chosen values)", False)
    edges, parts = [], []
    for label, entry in sorted(selection.items()):
        entry = entry or {}
        for what, grid, chosen in (("learning rate", entry.get("learning_rates"), entry.get("chosen_learning_rate")),
                                   (entry.get("knob") or "knob", entry.get("knob_values"), entry.get("chosen_value"))):
            grid = sorted(grid or [])
            if chosen is None or len(grid) == 0:
                continue
            if len(grid) < 3:
                edges.append(label)
                parts.append(f"{label} {what} {chosen:g}: a grid of {len(grid)} has no interior")
            elif not grid[0] < chosen < grid[-1]:
                edges.append(label)
                parts.append(f"{label} {what} {chosen:g} at the edge of {[float(f'{g:.3g}') for g in grid]}")
    return Gate(name, FLAG if edges else PASS, "; ".join(parts) or "every choice interior", False,
                tuple(dict.fromkeys(edges)), "choice on a grid edge")


def checkpoint_gate(arrays: Arrays) -> Gate:
    name = f"checkpoints: >= {MIN_CHECKPOINTS} per setting, log-spaced"
    trained = [label for label in arrays.labels.values() if label.algorithm != "best_of_n"]
    if not trained:
        return Gate(name, UNCHECKED, "no evaluated runs", False)
    short = []
    for label in trained:
        for curve in label.curves:
            steps = np.asarray(curve.steps, dtype=float)
            ratios = steps[1:] / np.maximum(steps[:-1], 1)
            if len(steps) < MIN_CHECKPOINTS or np.mean(ratios >= 1.5) < 0.5:
                short.append((label.name, len(steps)))
                break
    parts = [f"{name_}: {count} checkpoints" for name_, count in short]
    return Gate(name, FLAG if short else PASS, "; ".join(parts) or "every setting", False,
                tuple(name_ for name_, _ in short), "few checkpoints")


def runs_gate(data: RunDir) -> Gate:
    name = "runs finished"
    if data.runs.empty:
        return Gate(name, FAIL, "no runs", True)
    unfinished = data.runs[data.runs["status"] != "done"]
    if unfinished.empty:
        return Gate(name, PASS, f"{len(data.runs)} of {len(data.runs)}", False)
    first = unfinished.iloc[0]
    error = first.get("error")
    error = (error if isinstance(error, str) and error else str(first["status"])).splitlines()[0][:160]
    return Gate(name, FLAG, f"{len(unfinished)} of {len(data.runs)} not finished, e.g. {first['id']}: {error}", False,
                tuple(sorted(set(unfinished["label"].dropna()))) if "label" in unfinished else (), "unfinished runs")


def all_gates(data: RunDir, arrays: Arrays, task: str, budget: float, slope: float,
              chosen: dict[str, object]) -> list[Gate]:
    """Every gate; one that cannot be evaluated (malformed files) is ``not checked`` with the error, and blocks."""
    checks = [("proxy beats the prompt-blind rule", lambda: proxy_gate(data, task)),
              ("oracle reaches the proxy", lambda: oracle_gate(arrays, budget, slope, chosen, task,
                                                               _oracle_weights(data))),
              ("gold RM is credible", lambda: gold_gate(data, task)),
              ("learning rate and KL knob interior to their grids", lambda: interior_gate(data)),
              ("checkpoints", lambda: checkpoint_gate(arrays)), ("runs finished", lambda: runs_gate(data))]
    gates = []
    for name, check in checks:
        try:
            gates.append(check())
        except Exception as exc:  # a malformed file must not lose the report: the gate says it was not checked
            gates.append(Gate(name, UNCHECKED, f"could not be checked ({type(exc).__name__}: {exc})", True))
    return gates


def gate_table(gates: list[Gate]) -> pd.DataFrame:
    return pd.DataFrame([{"gate": g.name, "status": g.status, "blocks verdicts": "yes" if g.blocking else "no",
                          "numbers": g.numbers} for g in gates])
