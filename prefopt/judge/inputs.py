"""What the ``generate`` and ``eval`` commands read: models by name, prompt and pair sets, judges.

Evaluation sets are read strictly: a row the data layer would skip in training (a line that is not JSON, a prompt
that is not a string or a message list, a chat template that fails on it) is an error naming its file and line,
since a judged set with rows silently missing is not the set that was asked for (``--skip-bad-rows``: counted,
said on stderr and recorded with their places instead).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from prefopt.config import DataConfig, ModelConfig, from_dict
from prefopt.data import build_dataloader, read_records
from prefopt.data.readers import SkipLog, open_sources
from prefopt.errors import ConfigError, DataError
from prefopt.judge.sampling import Judge
from prefopt.models import TOKENIZER_FILES, load_causal_lm, load_tokenizer
from prefopt.registry import REWARDS
from prefopt.rl.rewards import RewardSpec, build_component

NAME = re.compile(r"^[A-Za-z_][\w.-]*$")


@dataclass
class ModelSpec:
    """A model to generate with or judge: the name its rows carry, and where it is loaded from."""

    name: str
    path: str


def model_specs(values: list[str]) -> list[ModelSpec]:
    """``NAME=PATH`` or ``PATH`` (named by the path as given); names must be unique."""
    specs = []
    for value in values:
        name, sep, path = value.partition("=")
        spec = ModelSpec(name, path) if sep and NAME.match(name) else ModelSpec(value, value)
        if not spec.path:
            raise ConfigError(f"--models {value!r}: no path after the name")
        if any(s.name == spec.name for s in specs):
            raise ConfigError(f"--models: the name {spec.name!r} is given twice; name them NAME=PATH")
        specs.append(spec)
    return specs


def load_policy(path: str, dtype: str, device: torch.device) -> nn.Module:
    """A causal LM (full weights, or a peft adapter on its base) frozen for evaluation."""
    return load_causal_lm(model_config(path, dtype), trainable=False).to(device)


def load_policy_tokenizer(path: str) -> Any:
    """A model's tokenizer (an adapter folder without tokenizer files: its base's)."""
    return load_tokenizer(model_config(path))


def vocabulary(tokenizer: Any) -> tuple[tuple[str, int], ...]:
    """What must be equal for two models' log-probs of the same token ids to be comparable."""
    return tuple(sorted(tokenizer.get_vocab().items()))


def model_config(path: str, dtype: str = "float32") -> ModelConfig:
    folder = Path(path).expanduser()
    tokenizer = None
    if (folder / "adapter_config.json").is_file() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        import peft

        tokenizer = peft.PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
    return ModelConfig(name_or_path=path, tokenizer=tokenizer, dtype=dtype)


@dataclass
class EvalSet:
    """The rows of an evaluation set in file order, where each came from, and what it was read from."""

    records: list[dict[str, Any]]
    places: list[str]
    """"file:line" of each record."""
    sources: list[dict[str, Any]]
    """Path, sha256 and size of each file read (prefopt.data.readers.Source.info)."""
    skipped: dict[str, Any]
    """Rows skipped with ``skip_bad`` per reason, with example places (empty: none)."""


def read_set(data: DataConfig, kind: str, what: str, skip_bad: bool = False) -> EvalSet:
    """Every ``kind`` record of ``data.path`` in file order. A bad row is an error naming it, unless ``skip_bad``:
    then it is counted (``skipped``) and said on stderr."""
    items, skips = read_records(data, kind)
    if not skip_bad:
        refuse_skips(skips, what)
    elif skips.total:
        print(f"prefopt: skipped {skips.total} bad rows of the {what}: {skips.summary()}", file=sys.stderr)
    if not items:
        raise DataError(f"{what} {data.path}: no usable rows in it")
    return EvalSet([r for _, r in items], [w for w, _ in items], [source.info for source in open_sources(data)],
                   skips.as_dict())


def batches_of(records: list[dict[str, Any]], places: list[str], kind: str, tokenizer: Any, data: DataConfig,
               batch_size: int, what: str) -> list[Any]:
    """Typed batches of ``records`` in order (the caller's batch size); a row that cannot be tokenized is an
    error naming its place."""
    skips = SkipLog()
    loader, _ = build_dataloader(records, kind, tokenizer, data, batch_size, shuffle=False, seed=0, skips=skips,
                                 places=places)
    refuse_skips(skips, what, hint=False)
    return list(loader)


def refuse_skips(skips: SkipLog, what: str, hint: bool = True) -> None:
    """DataError naming the first bad row (rows are read in order: the first reason counted is the earliest)."""
    if skips.total:
        reason = next(iter(skips.counts))
        more = f"; {skips.total} bad rows in all: {skips.summary()}" if skips.total > 1 else ""
        skip = "; --skip-bad-rows judges the others" if hint else ""
        raise DataError(f"{skips.examples[reason][0]}: {reason} (every row of the {what} must be usable{more}{skip})")


def judge_specs(values: list[str]) -> list[RewardSpec]:
    """``--judge`` values: a registered reward component (``format_validity``), a function ``module:function``
    (the ``callable`` component), or a YAML mapping as in ``algorithm.rewards`` (``{name: reward_model, params:
    {path: runs/rm/model}}``)."""
    specs = []
    for value in values:
        if value.lstrip().startswith("{"):
            try:
                data = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ConfigError(f"--judge {value!r}: not a YAML mapping: {str(exc).splitlines()[0]}") from None
            spec = from_dict(RewardSpec, data, where="--judge")
        elif ":" in value:
            spec = RewardSpec(name="callable", params={"fn": value})
        else:
            REWARDS.get(value)  # an unknown name lists the known ones
            spec = RewardSpec(name=value)
        specs.append(spec)
    return specs


def judge_names(specs: list[RewardSpec]) -> list[str]:
    """Column names of the judges: the spec's ``label``, else the component name (a function: its own name), unique by
    a suffix _2, _3 (as training names them in its logs, reward/<label>)."""
    names: list[str] = []
    for spec in specs:
        fn = spec.params.get("fn") if spec.name == "callable" else None
        base = spec.label or (str(fn).rpartition(":")[2] if isinstance(fn, str) else spec.name)
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def build_judges(specs: list[RewardSpec], tokenizer: Any, device: torch.device) -> dict[str, Judge]:
    """The judges as reward components (prefopt.rl.rewards), built for the policy's ``tokenizer``."""
    return {name: build_component(spec, tokenizer, device) for name, spec in zip(judge_names(specs), specs)}
