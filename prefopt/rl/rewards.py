"""Reward components for online algorithms and their weighted sum.

A component scores every response of a ``Rollout`` with one float: it is a class registered with
``@REWARDS.register(name)``, constructed as ``cls(tokenizer=..., device=..., **params)`` (``tokenizer`` is the
policy's) and called as ``component(rollout) -> Tensor[B]`` (float32). ``CompositeReward`` builds the
components named in a list of ``RewardSpec`` and returns their weighted sum together with each raw component,
so that every component is logged on its own (``reward/<name>``). This is Sparrow's reward
(Glaese et al. 2022): preference RM + rule terms + length penalty + format validity, each a pluggable term.

Built-ins: ``reward_model`` (a scalar RM from the reward stage), ``length_penalty``, ``format_validity``,
``callable`` (a reward function written for TRL's reward_funcs: prefopt.rl.callables), and ``target_token`` (the
known-reward task, prefopt.tasks).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from prefopt.config import DataConfig, ModelConfig
from prefopt.data.chat import is_chat, prompt_and_response_ids
from prefopt.data.collate import pad
from prefopt.data.kinds import fit
from prefopt.data.readers import SkipRow
from prefopt.errors import ConfigError
from prefopt.export import RECIPE_FILE
from prefopt.models import load_reward_model, load_tokenizer
from prefopt.registry import REWARDS
from prefopt.rl.callables import check_reward_function, import_function, recorded
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
    label: str | None = None
    """Name of this term in the logs (reward/<label>); default: the component's name (a callable: its function's)."""

    def __post_init__(self):
        """Checked when the recipe is read: a known component, parameters its constructor takes, and a callable's
        function importable and callable as TRL calls reward functions (recorded by its import path)."""
        cls = REWARDS.get(self.name)
        try:
            inspect.signature(cls).bind(tokenizer=None, device=None, **self.params)
        except TypeError as exc:
            raise ConfigError(f"reward component {self.name!r}: {exc}") from None
        fn = self.params.get("fn") if self.name == "callable" else None
        if fn is not None:
            check_reward_function(import_function(fn) if isinstance(fn, str) else fn, f"reward {self.name!r}")
            self.params = {**self.params, "fn": recorded(fn)}


def response_lengths(rollout: Rollout) -> Tensor:
    """Tokens of each response, its EOS included: [B] float."""
    return rollout.response_mask.sum(-1).float()


@REWARDS.register("reward_model")
class RewardModelReward:
    """Score of a scalar reward model from the reward stage (InstructGPT's r_theta(x, y)), read exactly where the reward
    stage trained it.

    The hand-off is by text, as TRL's GRPO/RLOO hand a completion to a reward model: each prompt, as the data gave it,
    and the decoded response are tokenized with the RM's OWN tokenizer by the reward stage's code
    (prefopt.data.chat.prompt_and_response_ids, the ``ranks`` kind's path): chat messages with the RM's chat template
    (the turn closed as the template closes it: ChatML's ``<|im_end|>\\n``; an RM of another family gets its own
    template, not the policy's), strings as prompt + response + EOS. A string response that did not end (cut at
    max_new_tokens) gets no EOS; a chat turn is always closed, as TRL does. The score is read at the last non-pad
    token (``RewardScorer``). The prompt and response are cut as the reward stage cut its rows, and chat is rendered
    as it was: ``max_length``, ``max_prompt_length`` and ``chat_template`` default to the reward stage's ``data``
    settings, read from the recipe saved with the RM (``prefopt_recipe.yaml``; DataConfig's defaults without one).
    """

    def __init__(self, tokenizer, device, path: str, batch_size: int = 32, max_length: int | None = None,
                 max_prompt_length: int | None = None, dtype: str = "float32", chat_template: str | None = None):
        cfg = ModelConfig(name_or_path=path, dtype=dtype)
        self.tokenizer = load_tokenizer(cfg)
        self.scorer = RewardScorer(load_reward_model(path, cfg)).to(device)
        self.device, self.batch_size = device, batch_size
        trained = trained_data(path)
        given = {"max_length": max_length, "max_prompt_length": max_prompt_length, "chat_template": chat_template}
        self.data = DataConfig(**{**trained, **{k: v for k, v in given.items() if v is not None}})

    def encode(self, prompt: Any, response: str, ended: bool) -> list[int]:
        """The RM's token ids of a prompt (a string or chat messages) and a response text, as the reward stage has
        them: rendered and then cut as the ``ranks`` kind cuts its rows (``data.max_prompt_length`` and
        ``data.max_length`` of the reward stage are this component's ``max_prompt_length`` and ``max_length``)."""
        reply = [{"role": "assistant", "content": response}] if is_chat(prompt) else response
        prompt_ids, (response_ids,) = prompt_and_response_ids(self.tokenizer, prompt, [reply], self.data.chat_template)
        if not (ended or is_chat(prompt)):
            response_ids = response_ids[:-1]  # the EOS the reward stage appends to a finished string response
        try:
            prompt_ids, (response_ids,) = fit(prompt_ids, [response_ids], self.data)
        except SkipRow:  # an empty response: the prompt's end alone
            return prompt_ids[-self.data.max_length:]
        return prompt_ids + response_ids

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> Tensor:
        ended = rollout.ended.tolist()
        prompts = rollout.raw_prompts or rollout.prompts
        rows = [self.encode(p, r, e) for p, r, e in zip(prompts, rollout.responses, ended)]
        scores = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            ids = pad(chunk, self.tokenizer.pad_token_id)
            mask = pad([[1] * len(row) for row in chunk], 0)
            scores.append(self.scorer(ids.to(self.device), mask.to(self.device)))
        return torch.cat(scores).float()


def trained_data(path: str) -> dict[str, Any]:
    """How the reward stage tokenized the rows of the RM at ``path``: ``max_length``, ``max_prompt_length`` and
    ``chat_template`` of the recipe saved with it (prefopt.export), or {} for an RM without one. A named or file
    template was saved with the RM's tokenizer (prefopt.data.run_tokenizer): it is read from there ("auto"), so a
    file named relative to where the reward stage ran is not looked for."""
    recipe = Path(path) / RECIPE_FILE
    try:
        data = yaml.safe_load(recipe.read_text(encoding="utf-8")).get("data") or {}
    except (OSError, AttributeError, yaml.YAMLError):
        return {}
    out = {key: data[key] for key in ("max_length", "max_prompt_length", "chat_template") if key in data}
    if out.get("chat_template") not in (None, "auto", "none"):
        out["chat_template"] = "auto"
    return out


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


class CompositeReward:
    """The weighted sum of reward components: ``__call__(rollout) -> (total [B], {label: raw [B]})``.

    A component may leave a response unscored (NaN: a reward function's None), as in TRL: the total is the sum of the
    weighted components that scored it (``nansum``); a response that NO component scored gets the mean total of the
    scored responses of its prompt's group (of the rollout when it has no groups; 0 when none is scored), so its
    advantage is 0 under grpo and rloo and it does not move its group's mean. TRL instead leaves such a response out
    of every statistic (nanmean, nanstd, a leave-one-out over the scored responses): with unscored responses in a
    group, prefopt's group std (k scored of n: n - 1 in its denominator, not k - 1) and RLOO baseline differ from TRL's.
    A label used twice gets a suffix (``count_cats``, ``count_cats_2``).
    """

    def __init__(self, specs: list[RewardSpec | dict[str, Any]], tokenizer, device):
        self.specs = [spec if isinstance(spec, RewardSpec) else RewardSpec(**spec) for spec in specs]
        if not self.specs:
            raise ConfigError("algorithm.rewards is empty: give at least one reward component "
                              f"(known: {', '.join(REWARDS.available())})")
        self.names: list[str] = []
        self.components = []
        for spec in self.specs:
            component = build_component(spec, tokenizer, device)
            label = spec.label or getattr(component, "name", spec.name)
            self.names.append(_unique("callable" if label == "<lambda>" else label, self.names))
            self.components.append(component)
        self.device = device

    def __call__(self, rollout: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        parts = {name: component(rollout).float().to(self.device)
                 for name, component in zip(self.names, self.components)}
        weighted = torch.stack([spec.weight * parts[name] for name, spec in zip(self.names, self.specs)], dim=1)
        total = weighted.nansum(dim=1)
        unscored = weighted.isnan().all(dim=1)
        if unscored.any():
            total = _fill_unscored(total, unscored, rollout.group)
        note_rewards(rollout, total, parts)  # samples.jsonl, while the Trainer records
        return total, parts


def _fill_unscored(total: Tensor, unscored: Tensor, group: Tensor | None) -> Tensor:
    """``total`` with each unscored row set to the mean of the scored rows of its group (0 when there is none)."""
    group = torch.zeros_like(unscored, dtype=torch.long) if group is None else group.to(total.device)
    total = total.clone()
    for g in group[unscored].unique():
        members = group == g
        scored = members & ~unscored
        total[members & unscored] = total[scored].mean() if scored.any() else 0.0
    return total


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
