"""Read a bench run directory (the files of /work/team/bench_schema.md) into frames; nothing else is read.

Every file is optional: a missing or unreadable one becomes a line in ``problems`` (file, line, what is wrong) and
the report says what it could not compute, never a traceback. Frames:

* ``labels``: plan.json's ``labels`` (label -> algorithm, kind, knob, policy_class, reward, oracle_of);
* ``runs``: one row per planned run (plan.json ``runs``; else every runs/**/run.json): the plan row, ``status``
  ("done" | "failed" | "missing" when run.json is absent), ``error``, and the cost fields (``cost.*`` flattened);
* ``evals``: one row per (run, step, set, prompt i) of the main and oracle runs' eval.jsonl, with the run's id,
  label, value, draw, seed, phase and reward; numeric columns only (responses: ``responses``, on demand);
* ``start``: the start's rows per (draw, set, i) (draws/draw<d>/start.jsonl), KL 0;
* ``best_of_n``: per (draw, i, j) (draws/draw<d>/best_of_n.jsonl);
* ``pref``: per (run, step, pair k) the implicit reward margin (chosen - ref_chosen) - (rejected - ref_rejected)
  (runs/<id>/pref.jsonl against draws/draw<d>/pairs.jsonl) and the pair's label and true order (``true_sign``:
  sign of gold_chosen - gold_rejected);
* ``draws``: per draw, the dicts of draw.json, labels.json and proxy.json; ``gold``: gold.json (hh).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

KEYS = ["id", "label", "value", "draw", "seed", "phase", "reward"]
JUDGED = ("main", "oracle")  # the phases whose eval.jsonl the report reads (select: val only; probe: costs only)
TEXT = ("response", "prompt", "logp_tokens")


@dataclass
class RunDir:
    path: Path
    bench: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, dict[str, Any]] = field(default_factory=dict)
    gold: dict[str, Any] = field(default_factory=dict)
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)
    evals: pd.DataFrame = field(default_factory=pd.DataFrame)
    start: pd.DataFrame = field(default_factory=pd.DataFrame)
    best_of_n: pd.DataFrame = field(default_factory=pd.DataFrame)
    pref: pd.DataFrame = field(default_factory=pd.DataFrame)
    draws: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.path))
        except ValueError:
            return str(path)

    def json(self, path: Path, required: bool = True) -> Any:
        """The parsed file, or None with a problem noted (missing only when ``required``)."""
        if not path.is_file():
            if required:
                self.problems.append(f"{self.relative(path)}: missing")
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.problems.append(f"{self.relative(path)}: not JSON ({exc})")
            return None

    def jsonl(self, path: Path, required: bool = True, keys: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """The file's rows; a bad line (not a JSON object, or without one of ``keys``) is skipped and noted with its
        line number."""
        if not path.is_file():
            if required:
                self.problems.append(f"{self.relative(path)}: missing")
            return []
        rows, bad = [], []
        # split on "\n" only: rows are written with ensure_ascii=False, and a response may hold U+2028 or U+0085,
        # which str.splitlines() would treat as line ends (losing the row)
        for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad.append(number)
                continue
            if isinstance(row, dict) and all(row.get(key) is not None for key in keys):
                rows.append(row)
            else:
                bad.append(number)
        if bad:
            self.problems.append(f"{self.relative(path)}: {len(bad)} unreadable line(s) skipped (first: line {bad[0]}"
                                 + (f"; each needs {', '.join(keys)})" if keys else ")"))
        return rows

    def responses(self, run_id: str, step: int, set_name: str = "eval") -> dict[int, str]:
        """Prompt i -> response text of one run's checkpoint (read on demand: samples in the report)."""
        row = self.runs[self.runs["id"] == run_id]
        if row.empty:
            return {}
        rows = self.jsonl(self.path / str(row.iloc[0]["dir"]) / "eval.jsonl", required=False)
        return {int(r["i"]): str(r.get("response", "")) for r in rows
                if r.get("step") == step and r.get("set", "eval") == set_name and "i" in r}


def read_run_dir(path: str | Path) -> RunDir:
    """Everything the report needs from ``path`` (module docstring)."""
    data = RunDir(Path(path))
    if not data.path.is_dir():
        data.problems.append(f"{data.path}: not a directory")
        return data
    data.bench = data.json(data.path / "bench.json") or {}
    data.manifest = data.json(data.path / "manifest.json") or {}
    plan = data.json(data.path / "plan.json") or {}
    data.labels = plan.get("labels", {}) if isinstance(plan, dict) else {}
    if data.bench.get("task") == "hh":
        data.gold = data.json(data.path / "gold.json") or {}
    pairs = _read_draws(data)
    _read_runs(data, plan.get("runs", []) if isinstance(plan, dict) else plan, pairs)
    return data


def config(data: RunDir, section: str, key: str, default: Any = None) -> Any:
    """bench.json's resolved config value ``section.key`` (``default`` when absent or null)."""
    value = ((data.bench.get("config") or {}).get(section) or {}).get(key)
    return default if value is None else value


def chosen_settings(data: RunDir) -> dict[str, object]:
    """Label -> the knob value chosen on val by the selection runs (manifest ``selection``); an oracle label takes
    the choice of the label it is the oracle of (plan.json ``labels``)."""
    selection = data.manifest.get("selection") or {}
    chosen = {label: entry.get("chosen_value") for label, entry in selection.items() if isinstance(entry, dict)}
    for label, meta in data.labels.items():
        if isinstance(meta, dict) and meta.get("oracle_of") in chosen and label not in chosen:
            chosen[label] = chosen[meta["oracle_of"]]
    return chosen


def _read_draws(data: RunDir) -> dict[int, pd.DataFrame]:
    """Fills start, best_of_n and draws; returns each draw's held-out pairs (pairs.jsonl, numeric columns)."""
    starts, bons, pairs = [], [], {}
    folders = [p for p in (data.path / "draws").glob("draw*") if _number(p.name) is not None]
    for folder in sorted(folders, key=lambda p: _number(p.name)):
        draw = _number(folder.name)
        data.draws[draw] = {name: data.json(folder / f"{name}.json", required=name == "proxy") or {}
                            for name in ("draw", "labels", "proxy")}
        pairs[draw] = pd.DataFrame([_numeric(r) for r in data.jsonl(folder / "pairs.jsonl", required=False)])
        starts += [{**_numeric(row), "draw": draw} for row in data.jsonl(folder / "start.jsonl", keys=("i", "gold"))]
        bons += [{**_numeric(row), "draw": draw}
                 for row in data.jsonl(folder / "best_of_n.jsonl", required=False, keys=("i", "j", "gold"))]
    if not data.draws:
        data.problems.append("draws/: no draw<d> folders (no start, labels or proxy to read)")
    planned = (data.bench.get("config") or {}).get("draws")
    if isinstance(planned, int) and data.draws and sorted(data.draws) != list(range(planned)):
        data.problems.append(f"bench.json: config.draws = {planned} but draws/ holds "
                             f"{', '.join(f'draw{d}' for d in sorted(data.draws))}")
    data.start = pd.DataFrame(starts)
    if not data.start.empty and "set" not in data.start:
        data.start["set"] = "eval"
    data.best_of_n = pd.DataFrame(bons)
    return pairs


def _read_runs(data: RunDir, plan: list[dict[str, Any]], pairs: dict[int, pd.DataFrame]) -> None:
    rows = [dict(row) for row in plan if isinstance(row, dict)]
    if not rows:  # no plan: every run.json found
        rows = [{"dir": str(p.parent.relative_to(data.path))} for p in sorted((data.path / "runs").rglob("run.json"))]
        if not rows:
            data.problems.append("plan.json lists no runs and runs/ holds no run.json")
    infos, evals, prefs = [], [], []
    for row in rows:
        folder = data.path / str(row.get("dir") or Path("runs") / str(row.get("id", "")))
        info = data.json(folder / "run.json", required=False)
        info = {**row, **(info or {"status": "missing", "error": "run.json not written"})}
        info["dir"] = data.relative(folder)
        info.setdefault("id", info["dir"])
        info.update({f"cost.{k}": v for k, v in (info.pop("cost", None) or {}).items()})
        infos.append(info)
        if info.get("status") != "done" or info.get("phase", "main") not in JUDGED:
            continue
        ident = {key: info.get(key) for key in KEYS}
        evals += [{**_numeric(r), **ident} for r in data.jsonl(folder / "eval.jsonl", keys=("step", "i", "kl"))]
        pref = pd.DataFrame([_numeric(r) for r in data.jsonl(folder / "pref.jsonl", required=False,
                                                             keys=("step", "k", "chosen", "rejected"))])
        held_out = pairs.get(info.get("draw"), pd.DataFrame())
        if not pref.empty and not held_out.empty and {"k", "chosen", "rejected"} <= set(pref):
            prefs.append(_margins(pref, held_out).assign(**ident))
    data.runs = pd.DataFrame(infos)
    data.evals = pd.DataFrame(evals)
    if not data.evals.empty and "set" not in data.evals:
        data.evals["set"] = "eval"
    data.pref = pd.concat(prefs, ignore_index=True) if prefs else pd.DataFrame()


def _margins(pref: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Per (step, k): the implicit reward margin under the run's policy (the evaluation core's ``implicit_margin``
    when the row has it, prefopt.judge.preference_rows) and the pair's true order."""
    merged = pref.merge(pairs, on="k", suffixes=("", "_pair"))
    out = merged[["step", "k"]].copy()
    out["margin"] = merged["implicit_margin"] if "implicit_margin" in merged else \
        (merged["chosen"] - merged["ref_chosen"]) - (merged["rejected"] - merged["ref_rejected"])
    if {"gold_chosen", "gold_rejected"} <= set(merged):
        out["true_sign"] = np.sign(merged["gold_chosen"] - merged["gold_rejected"])
    return out


def _numeric(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in TEXT and not isinstance(v, (list, dict))}


def _number(name: str) -> int | None:
    match = re.search(r"(\d+)$", name)
    return int(match.group(1)) if match else None
