"""Checks of a recipe against the models it names, before any weights are loaded (one place, run by the Trainer).

* ``data.max_length`` (and, for online algorithms, the prompt plus ``generation.max_new_tokens``) fits the
  starting model's context (``max_position_embeddings`` / ``n_positions`` of its config.json);
* a reward model (a ``reward_model`` reward component, a ``critic_path``) is a sequence-classification model with a
  score head, not a causal LM (which would train against a randomly initialised head);
* every model and tokenizer it names is a local folder that exists or a hub id (decided at once, so a mistyped
  folder is not tried on the hub: ``prefopt.models.model_source``);
* an online algorithm (kind ``prompts``) has a reward: some term with a non-zero weight (its Config's
  ``reward_terms()``, else its ``rewards`` list).

Only the model's config.json is read (``AutoConfig``); a model that cannot be found is left to the loader's error.
"""

from __future__ import annotations

from typing import Any

from prefopt.errors import ConfigError
from prefopt.models import model_source, not_a_policy

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_config(path: str, trust_remote_code: bool = False, what: str = "model.name_or_path") -> Any | None:
    """The transformers config at ``path`` (no weights), or None when it cannot be read here. A local path that does
    not exist is an error at once (prefopt.models.model_source), not a hub lookup."""
    from transformers import AutoConfig

    from prefopt.models import model_source

    path = model_source(path, what)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception:  # missing, offline hub id, adapter-only folder: the model loader reports it properly
        return None


def context_length(config: Any) -> int | None:
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_run(run: Any, kind: str) -> None:
    """Raise ConfigError for the first problem found (module docstring)."""
    model = run.model
    for key, source in model_sources(run):
        model_source(source, key)
    reason = not_a_policy(model.name_or_path) if run.algorithm_name != "reward" else None
    if reason:
        raise ConfigError(f"model.name_or_path={model.name_or_path!r}: {reason}")
    config = model_config(model.name_or_path, model.trust_remote_code) if model.name_or_path else None
    context = context_length(config) if config is not None else None
    if context is not None:
        if run.data.max_length > context:
            raise ConfigError(f"data.max_length={run.data.max_length}: longer than the context of "
                              f"{model.name_or_path} ({context} positions); set data.max_length <= {context}")
        generation = getattr(run.algorithm, "generation", None)
        new_tokens = getattr(generation, "max_new_tokens", 0)
        if kind == "prompts" and run.data.max_prompt_length + new_tokens > context:
            raise ConfigError(f"data.max_prompt_length={run.data.max_prompt_length} + algorithm.generation."
                              f"max_new_tokens={new_tokens} exceeds the context of {model.name_or_path} "
                              f"({context} positions)")
    for key, path in reward_model_paths(run.algorithm):
        check_score_head(key, path, model.trust_remote_code)
    if kind == "prompts":
        check_has_reward(run)


def model_sources(run: Any) -> list[tuple[str, str]]:
    """(key, path or hub id) of every model and tokenizer the run loads."""
    found = [("model.name_or_path", run.model.name_or_path)]
    if run.model.tokenizer:
        found.append(("model.tokenizer", run.model.tokenizer))
    reference = getattr(run.algorithm, "reference", None)
    if isinstance(reference, str) and reference:
        found.append(("algorithm.reference", reference))
    return found + reward_model_paths(run.algorithm)


def reward_model_paths(algorithm: Any) -> list[tuple[str, str]]:
    """(key, path) of every reward model the algorithm config names."""
    found = []
    for index, spec in enumerate(getattr(algorithm, "rewards", None) or []):
        if getattr(spec, "name", None) == "reward_model" and isinstance(spec.params.get("path"), str):
            found.append((f"algorithm.rewards[{index}].params.path", spec.params["path"]))
    critic = getattr(algorithm, "critic_path", None)
    if isinstance(critic, str):
        found.append(("algorithm.critic_path", critic))
    return found


def check_score_head(key: str, path: str, trust_remote_code: bool = False) -> None:
    config = model_config(path, trust_remote_code, key)
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise ConfigError(f"{key}={path!r}: not a reward model ({', '.join(architectures)} has no score head); "
                          "train one with algorithm.name=reward and give its model/ directory")


def check_has_reward(run: Any) -> None:
    algorithm = run.algorithm
    if hasattr(algorithm, "reward_terms"):
        terms = algorithm.reward_terms()
    else:
        terms = {spec.name: spec.weight for spec in getattr(algorithm, "rewards", None) or []}
    if not any(weight != 0 for weight in terms.values()):
        given = ", ".join(f"{name}: {weight:g}" for name, weight in terms.items())
        why = f"every term's weight is 0 ({given})" if terms else "algorithm.rewards is empty"
        raise ConfigError(f"algorithm {run.algorithm_name!r} has no reward: {why}; it would train on a reward of 0")
