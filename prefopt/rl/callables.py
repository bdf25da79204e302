"""Reward functions written for TRL: the ``callable`` reward component.

A function that works as one of TRL's ``GRPOTrainer(reward_funcs=[...])`` works here unchanged. It is called as TRL
1.16 calls it (``GRPOTrainer._calculate_rewards``)::

    fn(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None]

* ``prompts``: each prompt as the data gave it, a string or chat messages ``[{role, content}]``;
* ``completions``: the decoded responses, a string for a string prompt and ``[{"role": "assistant", "content":
  text}]`` for a chat prompt (TRL's conversational completions; decided row by row);
* ``completion_ids``: each response's token ids (EOS included when it ended);
* ``columns``: every other column of the prompt rows (``answer``, ``solution``, ...), one list entry per response;
* the result: one float per response, or ``None`` where the function cannot score it (TRL: NaN). A response that
  every component leaves unscored gets an advantage of 0 (see ``CompositeReward``, and how it differs from TRL).
TRL's ``trainer_state``, ``log_extra`` and ``log_metric`` keyword arguments are not passed; ``async def``
functions are awaited.

The function is named ``"module:function"`` in a recipe or ``prefopt eval --judge``; the working directory is
importable (``import_function``), and so is the recipe's directory (``prefopt.config.load_config``). A function object given in Python is recorded by that import path, so
the run config names it and the run resumes in a new process. Its signature is checked when the recipe is read:
it must take ``completions`` (or ``**kwargs``) by keyword.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from prefopt.errors import ConfigError, PrefoptError
from prefopt.registry import REWARDS
from prefopt.types import Rollout

log = logging.getLogger("prefopt.rewards")
GIVEN = ("prompts", "completions", "completion_ids")  # what every call passes, besides the data's columns


def import_function(spec: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function; ConfigError saying what is missing and where it looked."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"reward function {spec!r}: expected 'module:function'")
    here = os.getcwd()  # the working directory is importable, as under `python -m` (the console script omits it)
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"reward function {spec!r}: cannot import module {module_name!r}: {exc} (looked in the "
                          f"working directory {here}, beside the recipe and in the installed packages)") from exc
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ConfigError(f"reward function {spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


def function_path(fn: Callable[..., Any]) -> str | None:
    """``"module:qualname"`` when that path imports ``fn`` itself, else None (a lambda, a nested function)."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not name or "<" in name:
        return None
    if module == "__main__":
        return None  # a script's functions are importable only while it runs
    try:
        return f"{module}:{name}" if import_function(f"{module}:{name}") is fn else None
    except ConfigError:
        return None


def recorded(fn: str | Callable[..., Any]) -> str | Callable[..., Any]:
    """What a run config records for ``fn``: its import path (a string stays a string), or the object itself when it
    has none, with a warning that such a run cannot be resumed in another process."""
    if isinstance(fn, str):
        return fn
    path = function_path(fn)
    if path is None:
        log.warning("reward function %r is not importable by name (a lambda, a nested or __main__ function): the run "
                    "config cannot name it, so the run cannot be resumed in a new process; define it at the top "
                    "of a module and name it as 'module:function'", fn)
        return fn
    return path


def check_reward_function(fn: Callable[..., Any], where: str) -> None:
    """ConfigError unless ``fn`` can be called as TRL calls a reward function (module docstring)."""
    if not callable(fn):
        raise ConfigError(f"{where}: {fn!r} is not callable")
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return  # a builtin or C function: nothing to check
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
    positional_only = [p.name for p in parameters if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
    if positional_only or not ("completions" in names or takes_any):
        shown = ", ".join(p.name for p in parameters)
        raise ConfigError(f"{where}: reward function {_name(fn)}({shown}) cannot be called as TRL calls reward "
                          "functions: fn(prompts=..., completions=..., completion_ids=..., **dataset columns) -> "
                          "list[float | None]; name its parameters prompts and completions (add **kwargs for the "
                          "rest), as for TRL's reward_funcs")


@REWARDS.register("callable")
class CallableReward:
    """A reward function written for TRL's reward_funcs (``fn: "module:function"``; prefopt.rl.callables)."""

    def __init__(self, tokenizer, device, fn: str | Callable[..., Any]):
        self.fn = import_function(fn) if isinstance(fn, str) else fn
        check_reward_function(self.fn, "callable reward")
        self.device = device
        self.name = getattr(self.fn, "__name__", "callable")

    def arguments(self, rollout: Rollout) -> dict[str, Any]:
        """The keyword arguments of one call (module docstring)."""
        prompts = list(rollout.raw_prompts or rollout.prompts)
        completions = [[{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
                       for prompt, text in zip(prompts, rollout.responses)]
        ids = [row[mask.bool()].tolist() for row, mask in zip(rollout.response_ids, rollout.response_mask)]
        keys = list(dict.fromkeys(key for meta in rollout.meta for key in meta if key not in GIVEN))
        columns = {key: [meta.get(key) for meta in rollout.meta] for key in keys}
        return {"prompts": prompts, "completions": completions, "completion_ids": ids, **columns}

    def __call__(self, rollout: Rollout) -> Tensor:
        arguments = self.arguments(rollout)
        try:
            inspect.signature(self.fn).bind(**arguments)
        except TypeError as exc:
            columns = ", ".join(list(arguments)[len(GIVEN):]) or "none"
            raise PrefoptError(f"reward function {_name(self.fn)}: {exc}; it is given prompts, completions, "
                               f"completion_ids and the columns of the prompt rows ({columns})") from None
        except ValueError:  # no signature to bind against
            pass
        try:
            values = self.fn(**arguments)
            if inspect.isawaitable(values):
                values = asyncio.run(_awaited(values))
            values = list(values)
        except Exception as exc:  # the user's function failed: their error, in one line (-v shows the traceback)
            raise PrefoptError(f"reward function {_name(self.fn)} raised {type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:300]}") from exc
        wrong = [v for v in values if v is not None and not _is_number(v)]
        if wrong:
            raise PrefoptError(f"reward function {_name(self.fn)} returned {wrong[0]!r} ({type(wrong[0]).__name__}) "
                               "among its values (expected one float or None per response)")
        values = [float("nan") if value is None else float(value) for value in values]
        out = torch.as_tensor(values, dtype=torch.float32, device=self.device)
        if out.shape != (len(rollout.responses),):
            raise PrefoptError(f"reward function {_name(self.fn)} returned {tuple(out.shape)} values for "
                               f"{len(rollout.responses)} responses (expected one float or None per response)")
        return out


def _is_number(value: Any) -> bool:
    """A float, an int or a one-element tensor / array; not a string or a bool (a wrong type, not a reward)."""
    if isinstance(value, (str, bytes, bool)):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True

async def _awaited(values: Any) -> Any:
    return await values


def _name(fn: Callable[..., Any]) -> str:
    return function_path(fn) or getattr(fn, "__qualname__", repr(fn))
