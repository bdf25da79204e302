"""Name -> object registries for algorithms, pairwise losses, reward components and data kinds.

New entries register by decorator::

    from prefopt.registry import LOSSES

    @LOSSES.register("my_loss")
    def my_loss(logps, beta): ...

Installed third-party packages register through the entry-point group ``prefopt.algorithms``: each entry
point names a module (or an object); loading it runs its decorators. Entry points are loaded once, the first
time any registry is queried. A duplicate name is an error; an unknown name is an error that lists the known
names and the closest match.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, TypeVar

from prefopt.errors import PrefoptError, UnknownNameError

T = TypeVar("T")

ENTRY_POINT_GROUP = "prefopt.algorithms"
BUILTIN_MODULES = ("prefopt.data.kinds", "prefopt.rl", "prefopt.algorithms", "prefopt.rl.rewards", "prefopt.bench.world")
"""Modules whose decorators register prefopt's own entries (the bench's world registers its true reward)."""
_builtins_loaded = False
_plugins_loaded = False


def closest(name: str, names: list[str]) -> str | None:
    """The closest known name to ``name``, or None when nothing is close."""
    matches = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return matches[0] if matches else None


def load_plugins() -> None:
    """Import prefopt's built-in entries, then every entry point in the ``prefopt.algorithms`` group."""
    global _builtins_loaded, _plugins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            if importlib.util.find_spec(module) is not None:
                importlib.import_module(module)
    if not _plugins_loaded:
        _plugins_loaded = True
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            try:
                entry.load()
            except Exception as exc:  # a broken plugin must not hide the others; say which one broke
                raise PrefoptError(f"plugin entry point {entry.name!r} ({entry.value}) failed to load: {exc}") from exc


class Registry(Generic[T]):
    """One dict of named entries of one sort (e.g. "algorithm", "loss")."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name``; a name already taken is an error."""

        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise PrefoptError(f"{self.what} {name!r} is already registered (by {_origin(self._entries[name])})")
            self._entries[name] = obj
            try:
                obj.registry_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return decorator

    def get(self, name: str) -> T:
        """The entry registered as ``name``; an unknown name lists the known ones and the closest match."""
        load_plugins()
        if name not in self._entries:
            names = sorted(self._entries)
            hint = closest(name, names)
            hint_text = f" Did you mean {hint!r}?" if hint else ""
            raise UnknownNameError(f"unknown {self.what} {name!r}.{hint_text} Known: {', '.join(names) or '(none)'}")
        return self._entries[name]

    def available(self) -> list[str]:
        """All registered names, sorted."""
        load_plugins()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        load_plugins()
        return sorted(self._entries.items())

    def unregister(self, name: str) -> None:
        """Remove an entry (tests and interactive use)."""
        self._entries.pop(name, None)

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._entries


def _origin(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


ALGORITHMS: Registry[Any] = Registry("algorithm")
"""Algorithm classes (subclasses of prefopt.algorithm.Algorithm)."""
LOSSES: Registry[Any] = Registry("pairwise loss")
"""Pairwise preference losses: fn(logps: PairLogps, beta: float, **params) -> per-pair loss [B]."""
REWARDS: Registry[Any] = Registry("reward component")
"""Reward components for online algorithms (see prefopt.rl.rewards)."""
KINDS: Registry[Any] = Registry("data kind")
"""Data kinds: how raw rows become typed batches (see prefopt.data.kinds)."""
ADVANTAGES: Registry[Any] = Registry("advantage estimator")
"""Online advantage estimators: fn(inputs: AdvantageInputs, cfg) -> (advantages [B, T], returns [B, T] | None)
(see prefopt.rl.advantages)."""
POLICY_LOSSES: Registry[Any] = Registry("policy loss")
"""Online policy losses: fn(inputs: PolicyLossInputs, cfg) -> (loss, metrics) (see prefopt.rl.losses)."""


def register_algorithm(name: str):
    return ALGORITHMS.register(name)


def register_loss(name: str):
    return LOSSES.register(name)


def register_reward(name: str):
    return REWARDS.register(name)


def get(name: str) -> Any:
    """An algorithm by name (the common case)."""
    return ALGORITHMS.get(name)


def available() -> list[str]:
    """The names of all registered algorithms."""
    return ALGORITHMS.available()
