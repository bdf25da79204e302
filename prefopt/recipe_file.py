"""Recipe files and overrides as plain data: YAML read strictly, ``${VAR}`` expanded in values, overrides merged.

* ``read_yaml``: a recipe file -> dict. A recipe cannot hurt: a file over ``MAX_BYTES`` is refused unread, and so
  is one whose aliases expand to more than ``MAX_NODES`` values (a "billion laughs" recipe: counted on the node
  graph before anything is built, in a time linear in the file). A key given twice in one mapping is an error
  naming both lines; YAML merge keys (``<<: *defaults``) are supported (a key written beside them overrides a
  merged one, as YAML says). Then ``${VAR}`` / ``${VAR:-default}`` are expanded inside string values only (after
  parsing, so a variable can never add keys or sections); a value that is one whole ``${VAR}`` is read as a YAML
  scalar (``max_steps: ${STEPS}`` gives a number). Every error of a variable names it and the key: unset without a
  default, malformed (``${VAR``), or a value the key refuses (``explain_env`` adds where the value came from).
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
_WHOLE = re.compile(r"\s*\$\{(\w+)(?::-([^}]*))?\}\s*")
MAX_BYTES = 1 << 20  # a recipe is a page of settings, not data
MAX_NODES = 100_000  # values after alias expansion


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


def expand_env_values(data: Any, where: str = "", sources: dict[str, str] | None = None) -> Any:
    """``expand_env`` in every string value of a parsed recipe (keys and structure are never substituted); a value
    that is one whole ``${VAR}`` is read as a YAML scalar. ``sources`` collects ``{key: "${VAR}=value"}``."""
    if isinstance(data, dict):
        return {k: expand_env_values(v, f"{where}.{k}" if where else str(k), sources) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env_values(v, f"{where}[{i}]", sources) for i, v in enumerate(data)]
    if not isinstance(data, str) or "$" not in data:
        return data
    leftover = _ENV.sub("", data)
    if "${" in leftover:
        raise ConfigError(f"{where or 'config'}={data!r}: a malformed ${{...}} (write ${{NAME}} or ${{NAME:-default}}, "
                          "NAME of letters, digits and _)")
    names = [m.group(1) for m in _ENV.finditer(data)]
    value = expand_env(data, where)
    if sources is not None and names:
        sources[where] = ", ".join(f"${{{name}}}" for name in names) + f" = {value!r}"
    if _WHOLE.fullmatch(data):
        try:
            parsed = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            return value
        return parsed if isinstance(parsed, (str, int, float, bool)) else value
    return value


def explain_env(message: str, sources: dict[str, str]) -> str:
    """``message`` (an error naming a key) with where the key's value came from, when a variable gave it."""
    for key, source in sources.items():
        if re.search(rf"(^|[\s'\"(]){re.escape(key)}([=:'\"\s]|$)", message):
            return f"{message} (the value of {key} comes from {source})"
    return message


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged by SafeLoader, may repeat keys
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{self.name}:{key_node.start_mark.line + 1}: key {key!r} is given twice "
                                  f"(first on line {seen[key] + 1})")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def expanded_size(node: yaml.Node, limit: int) -> int:
    """The number of values ``node`` stands for once every alias is expanded (counting stops past ``limit``);
    each node is visited once (an alias is the node it names), so this is linear in the file."""
    sizes: dict[int, int] = {}
    order, stack = [], [node]
    while stack:  # post-order without recursion: a deep recipe cannot overflow the stack
        current = stack.pop()
        if id(current) in sizes:
            continue
        sizes[id(current)] = -1
        order.append(current)
        stack.extend(_children(current))
    for current in reversed(order):
        sizes[id(current)] = min(limit + 1, 1 + sum(sizes[id(child)] for child in _children(current)))
    return sizes[id(node)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def read_yaml(path: str | Path, sources: dict[str, str] | None = None) -> dict[str, Any]:
    """The recipe at ``path`` as a dict (module docstring); ``sources`` collects the keys variables gave."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} not found")
    if path.stat().st_size > MAX_BYTES:
        raise ConfigError(f"recipe {str(path)!r}: {path.stat().st_size} bytes, more than a recipe may hold "
                          f"({MAX_BYTES}); data belongs in data files")
    try:
        loader = _UniqueKeyLoader(path.read_text())
        loader.name = str(path)
        try:
            node = loader.get_single_node()
            if node is not None and expanded_size(node, MAX_NODES) > MAX_NODES:
                raise ConfigError(f"{path}: its aliases (*name) expand to more than {MAX_NODES} values (a 'billion "
                                  "laughs' recipe?); refused")
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe {str(path)!r}: cannot read it: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping with sections algorithm, model, data, train")
    try:
        return expand_env_values(data, sources=sources)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
