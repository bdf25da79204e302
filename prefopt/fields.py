"""Dataclasses read from mappings: every key and type checked, a NaN or infinite number refused, and every error
naming the dotted key (with the closest known key). The reader of run recipes (prefopt.config), of bench recipes and
of evaluation settings; ``describe_fields`` lists a dataclass's fields with their docstrings (``prefopt list``)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

from prefopt.errors import ConfigError
from prefopt.registry import closest


def check(ok: bool, key: str, value: Any, why: str) -> None:
    """Raise a ConfigError naming ``key`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and type; errors name the dotted key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    renamed = getattr(cls, "renamed_keys", {})  # old key -> its new name, for a clear error on an old recipe
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key in renamed and key not in fields:
            new = f"{where}.{renamed[key]}" if where else renamed[key]
            raise ConfigError(f"{dotted} was renamed {new}: write {renamed[key]}: {value!r} instead")
        if key not in fields:
            hint = closest(str(key), list(fields))
            raise ConfigError(f"unknown config key {dotted!r}" + (f"; did you mean {hint!r}?" if hint else "")
                              + f" Known keys{' of ' + where if where else ''}: {', '.join(fields)}")
        kwargs[key] = _coerce(hints[key], value, dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}={value!r}: expected {_name(tp)}")
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false (mixed_precision: no)
            value = "no"
        if value not in args:
            hint = closest(str(value), [str(a) for a in args])
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(repr, args))}"
                              + (f"; did you mean {hint!r}?" if hint else ""))
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return [_coerce(args[0] if args else Any, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        return {k: _coerce(args[1] if args else Any, v, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 5e-5 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r}: must be a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return value
    return value


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def describe_fields(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, docstring) for each field of a config dataclass a recipe may set (``init`` fields: a
    subclass pins an inherited field with ``field(init=False)``), read from the source."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # a subclass's doc wins
        try:
            tree = ast.parse(inspect.getsource(klass))
            body = tree.body[0].body  # type: ignore[attr-defined]
        except (OSError, TypeError, IndexError):
            continue
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = str(nxt.value.value).strip()  # type: ignore[union-attr]
    out = []
    hints = typing.get_type_hints(cls)
    for f in (f for f in dataclasses.fields(cls) if f.init):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        out.append((f.name, _name(hints.get(f.name, Any)), default, docs.get(f.name, "")))
    return out
