"""Reward components for online algorithms and their weighted sum.

A component scores every response of a ``Rollout`` with one float: it is a class registered with
``@REWARDS.register(name)``, constructed as ``cls(tokenizer=..., device=..., **params)`` (``tokenizer`` is the
policy's) and called as ``component(rollout) -> Tensor[B]`` (float32). ``CompositeReward`` builds the
components named in a list of ``RewardSpec`` and returns their weighted sum together with each raw component,
so that every component is logged on its own (``reward/<name>``). This is Sparrow's reward
(Glaese et al. 2022): preference RM + rule terms + length penalty + format validity, each a pluggable term.

Built-ins: ``reward_model`` (a scalar RM from the reward stage), ``length_penalty``, ``format_validity``,
``callable`` (a user function), and ``target_token`` (the known-reward task, prefopt.tasks).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from prefopt.config import ModelConfig
from prefopt.errors import ConfigError, PrefoptError
from prefopt.models import load_reward_model, load_tokenizer
from prefopt.registry import REWARDS
from prefopt.samples import note_rewards
from prefopt.scoring import RewardScorer
from prefopt.types import Rollout


@dataclass
class RewardSpec:
    """One term of the reward: a registered component, its weight and its parameters."""

    name: str
    """Registered reward component (reward_model, length_penalty, format_validity, callable, target_token, ...)."""
    weight: float = 1.0
    """Multiplier of this component in the total reward."""
    params: dict[str, Any] = field(default_factory=dict)
    """Keyword parameters of the component, e.g. {path: runs/hh-tiny/reward/model} for reward_model."""


def response_lengths(rollout: Rollout) -> Tensor:
    """Tokens of each response, its EOS included: [B] float."""
    return rollout.response_mask.sum(-1).float()


@REWARDS.register("reward_model")
class RewardModelReward:
    """Score of a scalar reward model from the reward stage (InstructGPT's r_theta(x, y)).

    The prompt and response texts are re-tokenized with the RM's own tokenizer exactly as the reward stage
    tokenized its training rows (separately, no special tokens, concatenated) with EOS appended when the
    response ended with EOS; the score is read at the last non-pad token (``RewardScorer``). Sequences longer
    than ``max_length`` keep their end.
    """

    def __init__(self, tokenizer, device, path: str, batch_size: int = 32, max_length: int = 512,
                 dtype: str = "float32"):
        cfg = ModelConfig(name_or_path=path, dtype=dtype)
        self.tokenizer = load_tokenizer(cfg)
        self.scorer = RewardScorer(load_reward_model(path, cfg)).to(device)
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    def encode(self, prompt: str, response: str, ended: bool) -> list[int]:
        ids = self.tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        ids = ids + self.tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"]
        if ended:
            ids = ids + [self.tokenizer.eos_token_id]
        return ids[-self.max_length:]

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> Tensor:
        ended = rollout.ended.tolist()
        rows = [self.encode(p, r, e) for p, r, e in zip(rollout.prompts, rollout.responses, ended)]
        scores = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(chunk):
                ids[i, :len(row)] = torch.tensor(row)
                mask[i, :len(row)] = 1
            scores.append(self.scorer(ids.to(self.device), mask.to(self.device)))
        return torch.cat(scores).float()


@REWARDS.register("length_penalty")
class LengthPenalty:
    """``-coef * max(0, L - target)`` for a response of L tokens (EOS included): only overlong responses pay.

    ``two_sided: true`` gives ``-coef * |L - target|`` (short responses pay too).
    """

    def __init__(self, tokenizer, device, target: int = 0, coef: float = 0.01, two_sided: bool = False):
        self.target, self.coef, self.two_sided, self.device = target, coef, two_sided, device

    def __call__(self, rollout: Rollout) -> Tensor:
        excess = response_lengths(rollout) - self.target
        excess = excess.abs() if self.two_sided else excess.clamp(min=0)
        return (-self.coef * excess).to(self.device)


@REWARDS.register("format_validity")
class FormatValidity:
    """``valid`` (1) when the response is non-empty and does not start a new turn (none of ``markers``, by
    default "\\n\\nHuman:", occurs in it), else ``invalid`` (0; set it negative for a penalty)."""

    def __init__(self, tokenizer, device, markers: list[str] | None = None, valid: float = 1.0,
                 invalid: float = 0.0):
        self.markers = list(markers) if markers is not None else ["\n\nHuman:"]
        self.valid, self.invalid, self.device = valid, invalid, device

    def is_valid(self, response: str) -> bool:
        return bool(response.strip()) and not any(marker in response for marker in self.markers)

    def __call__(self, rollout: Rollout) -> Tensor:
        values = [self.valid if self.is_valid(r) else self.invalid for r in rollout.responses]
        return torch.tensor(values, dtype=torch.float32, device=self.device)


@REWARDS.register("callable")
class CallableReward:
    """A user function ``fn(prompts, responses, meta) -> list[float]``, given as ``"module:function"``."""

    def __init__(self, tokenizer, device, fn: str | Callable[..., Any]):
        self.fn = import_function(fn) if isinstance(fn, str) else fn
        self.device = device

    def __call__(self, rollout: Rollout) -> Tensor:
        name = f"reward function {getattr(self.fn, '__module__', '?')}:{getattr(self.fn, '__qualname__', self.fn)}"
        try:
            values = list(self.fn(list(rollout.prompts), list(rollout.responses), list(rollout.meta)))
        except Exception as exc:  # the user's function failed: their error, one line (-v shows the traceback)
            raise PrefoptError(f"{name} raised {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
        if len(values) != len(rollout.responses):
            raise PrefoptError(f"{name} returned {len(values)} values for {len(rollout.responses)} responses "
                               "(expected one number per response)")
        wrong = [v for v in values if isinstance(v, (str, bytes, bool)) or not _is_number(v)]
        if wrong:
            raise PrefoptError(f"{name} returned {wrong[0]!r} ({type(wrong[0]).__name__}) among its values "
                               "(expected one number per response)")
        return torch.tensor([float(v) for v in values], dtype=torch.float32, device=self.device)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, torch.Tensor) or value.numel() == 1


def import_function(spec: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function; ConfigError saying what is missing."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"reward function {spec!r}: expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"reward function {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward function {spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


class CompositeReward:
    """The weighted sum of reward components: ``__call__(rollout) -> (total [B], {name: raw [B]})``.

    A name used twice gets a suffix (``callable``, ``callable_2``) so both are logged.
    """

    def __init__(self, specs: list[RewardSpec | dict[str, Any]], tokenizer, device):
        self.specs = [spec if isinstance(spec, RewardSpec) else RewardSpec(**spec) for spec in specs]
        if not self.specs:
            raise ConfigError("algorithm.rewards is empty: give at least one reward component "
                              f"(known: {', '.join(REWARDS.available())})")
        self.names: list[str] = []
        self.components = []
        for spec in self.specs:
            self.names.append(_unique(spec.name, self.names))
            self.components.append(build_component(spec, tokenizer, device))
        self.device = device

    def __call__(self, rollout: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        parts = {name: component(rollout).float().to(self.device)
                 for name, component in zip(self.names, self.components)}
        total = torch.zeros(len(rollout.responses), device=self.device)
        for name, spec in zip(self.names, self.specs):
            total = total + spec.weight * parts[name]
        note_rewards(rollout, total, parts)  # samples.jsonl, while the Trainer records
        return total, parts


def build_component(spec: RewardSpec, tokenizer, device):
    """Construct one registered component; wrong parameters are a ConfigError naming the component."""
    cls = REWARDS.get(spec.name)
    try:
        return cls(tokenizer=tokenizer, device=device, **spec.params)
    except TypeError as exc:
        raise ConfigError(f"reward component {spec.name!r}: {exc}") from exc


def _unique(name: str, taken: list[str]) -> str:
    if name not in taken:
        return name
    n = 2
    while f"{name}_{n}" in taken:
        n += 1
    return f"{name}_{n}"


from prefopt import tasks  # noqa: E402,F401  (registers the known-reward task's component)
