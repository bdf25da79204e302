"""Recipe files and overrides as plain data: YAML read strictly, ``${VAR}`` expanded in values, overrides merged.

* ``read_yaml``: a recipe file -> dict; a key given twice in one mapping is an error naming both lines; then
  ``${VAR}`` / ``${VAR:-default}`` are expanded inside string values only (after parsing, so a variable can never
  add keys or sections); an unset variable without a default is an error naming the key.
* ``parse_overrides`` / ``merge``: ``section.key=value`` command-line overrides (values parsed as YAML scalars).

Validation against the config dataclasses is ``prefopt.config``'s job.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from prefopt.errors import ConfigError


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.max_steps=5", "algorithm.beta=0.2"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (update wins)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_env(text: str, where: str = "") -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in one string with the environment's value (recipes use
    PREFOPT_HH_DIR); an unset (or empty) variable without a default is a ConfigError naming ``where``."""

    def value(match: re.Match) -> str:
        found = os.environ.get(match.group(1))
        if found:
            return found
        if match.group(2) is None:
            raise ConfigError(f"{where or 'config'}: environment variable {match.group(1)} is not set (write "
                              f"${{{match.group(1)}:-default}} for a default)")
        return match.group(2)

    return _ENV.sub(value, text)


def expand_env_values(data: Any, where: str = "") -> Any:
    """``expand_env`` in every string value of a parsed recipe (keys and structure are never substituted)."""
    if isinstance(data, dict):
        return {k: expand_env_values(v, f"{where}.{k}" if where else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env_values(v, f"{where}[{i}]") for i, v in enumerate(data)]
    return expand_env(data, where) if isinstance(data, str) else data


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{self.name}:{key_node.start_mark.line + 1}: key {key!r} is given twice "
                                  f"(first on line {seen[key] + 1})")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} not found")
    try:
        loader = _UniqueKeyLoader(path.read_text())
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe {str(path)!r}: cannot read it: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping with sections algorithm, model, data, train")
    try:
        return expand_env_values(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
