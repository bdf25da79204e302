"""Loading models and tokenizers: a hub id or a local directory, with optional LoRA / QLoRA adapters (peft).

transformers owns models, tokenizers and generation; peft owns adapters. This module only decides how they are
called from a ``ModelConfig``: dtype, safetensors only, remote code only when asked, 4-bit NF4 through
bitsandbytes (QLoRA, Dettmers et al. 2023) and LoRA adapters (Hu et al. 2021).

The reference policy of a LoRA policy is the same weights with the adapter switched off
(``reference_context``), so no second copy of the model is loaded; a full fine-tune needs a frozen copy
(``load_causal_lm(cfg, trainable=False)``). Tiny models built locally from the data live in ``prefopt.tiny``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import peft
import torch
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase)
from trl.trainer.utils import disable_dropout_in_model

from prefopt.config import ModelConfig
from prefopt.errors import PrefoptError
from prefopt.registry import closest

logger = logging.getLogger("prefopt.models")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                   "vocab.txt")
TOKENIZER_PROBE = "Hello, world."
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of ``cfg.tokenizer`` (or ``cfg.name_or_path``), right-padded, with a pad token.

    A tokenizer without a pad token pads with eos (a warning says so); one with neither is an error. So is a
    local folder without tokenizer files, and a tokenizer that encodes text to no tokens (transformers builds an
    empty one from a model folder that lacks them, which would train on empty sequences).
    """
    source = cfg.tokenizer or cfg.name_or_path
    what = "tokenizer" if cfg.tokenizer else "model"  # the message names the key the user set
    folder = Path(source).expanduser() if source else None
    if folder is not None and folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
        raise PrefoptError(f"{key} {source!r} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
                           "save the tokenizer there (tokenizer.save_pretrained) or set model.tokenizer")
    tokenizer = from_pretrained(AutoTokenizer, source, what, trust_remote_code=cfg.trust_remote_code)
    if not tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]:
        raise PrefoptError(f"tokenizer of {source!r} encodes {TOKENIZER_PROBE!r} to no tokens (an empty vocabulary: "
                           f"are its files incomplete?); {len(tokenizer)} tokens in it")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PrefoptError(f"tokenizer {source!r} has no pad or eos token; add a pad token to it "
                               "(tokenizer.add_special_tokens({'pad_token': ...}) and save it) or choose another")
        logger.warning("tokenizer %r has no pad token; padding with its eos token %r", source, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    # the data layer truncates to data.max_length itself: "Token indices sequence length is longer than the
    # specified maximum sequence length" (transformers' once-per-tokenizer warning) would only be noise
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def load_causal_lm(cfg: ModelConfig, path: str | None = None, trainable: bool = True) -> PreTrainedModel:
    """The causal LM at ``path`` (default ``cfg.name_or_path``), ready to train or frozen as a reference.

    Trainable: 4-bit bases are prepared for k-bit training, a LoRA adapter is added when ``cfg.lora.r > 0``
    (then only the adapter trains), gradient checkpointing is on when asked and the KV cache is off.
    ``trainable=False``: eval mode, no parameter requires grad, no adapter. Dropout is off unless
    ``cfg.disable_dropout`` is false (``disable_dropout``).
    """
    source = path or cfg.name_or_path
    reason = not_a_policy(source, adapter_ok=True)
    if reason:
        raise PrefoptError(f"model {source!r} is {reason}")
    kwargs = _weights_kwargs(cfg)
    if cfg.load_in_4bit:
        kwargs.update(_quantization_kwargs(kwargs["dtype"]))
    model = from_pretrained(AutoModelForCausalLM, source, "model", **kwargs)
    if cfg.disable_dropout:
        disable_dropout(model)
    if not trainable:
        return _freeze(model)
    model.config.use_cache = False
    checkpointing = {"use_reentrant": False}
    if cfg.load_in_4bit:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                     gradient_checkpointing_kwargs=checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    if cfg.lora.r > 0:
        lora = peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                               target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, lora)
    model.train()
    return model


def not_a_policy(source: str, adapter_ok: bool = False) -> str | None:
    """Why the local folder ``source`` cannot be loaded as a policy (a causal LM), else None: a reward model's
    weights (a sequence-classification head: its LM head would be random), or, unless ``adapter_ok``, a LoRA
    adapter (training starts from full weights)."""
    folder = Path(source).expanduser()
    try:
        adapter = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        adapter = None
    if isinstance(adapter, dict) and adapter.get("task_type") == "SEQ_CLS":
        return ("a reward model's LoRA adapter (task_type SEQ_CLS), not a causal LM: give a policy's model/ folder "
                "(an SFT, DPO or GRPO run's)")
    if not adapter_ok and adapter is not None and not (folder / "config.json").is_file():
        return (f"a LoRA adapter (adapter_config.json, no weights of its own): merge it into its base first "
                f"(prefopt merge-adapter {source} OUT) and start from OUT")
    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    if architectures and all(name.endswith("ForSequenceClassification") for name in architectures):
        return (f"a reward model ({', '.join(architectures)}), not a causal LM: give a policy's model/ folder "
                "(an SFT, DPO or GRPO run's)")
    return None


def needs_separate_reference(model: nn.Module) -> bool:
    """False for a peft model (its reference is the base with the adapter off), True otherwise."""
    return not isinstance(model, peft.PeftModel)


@contextlib.contextmanager
def reference_context(model: nn.Module, ref_model: nn.Module | None = None) -> Iterator[nn.Module]:
    """Yield the reference policy: ``ref_model`` when given, else ``model`` with its LoRA adapter disabled.

    For a model without an adapter and no ``ref_model`` this is a no-op that yields ``model`` (for instance a
    frozen reference passed as itself). Gradients are not switched off here; wrap the call in ``torch.no_grad()``.
    """
    if ref_model is not None or not isinstance(model, peft.PeftModel):
        yield model if ref_model is None else ref_model
        return
    with model.disable_adapter():
        yield model


def load_reward_model(path: str, cfg: ModelConfig, trainable: bool = False) -> PreTrainedModel:
    """A scalar reward model: ``AutoModelForSequenceClassification`` with one label and a pad token id.

    The score is read at the last non-pad token, so ``config.pad_token_id`` must be set; it is taken from the
    tokenizer (``cfg.tokenizer`` or ``path``) when the checkpoint lacks it. Frozen unless ``trainable``. Uses
    ``cfg.dtype`` and ``cfg.trust_remote_code``. Trainable with ``cfg.lora.r > 0``: a LoRA adapter on the backbone
    while the score head trains in full (peft's SEQ_CLS ``modules_to_save``); 4-bit loading is not applied.
    Dropout is off unless ``cfg.disable_dropout`` is false.
    """
    hf_logger = logging.getLogger("transformers.modeling_utils")  # its table of missing keys, said here instead
    hf_logger.addFilter(_no_load_report)  # (not its level: transformers checks TP plans when that is >= WARNING)
    try:
        model, info = from_pretrained(AutoModelForSequenceClassification, path, "reward model", num_labels=1,
                                      output_loading_info=True, **_weights_kwargs(cfg))
    finally:
        hf_logger.removeFilter(_no_load_report)
    new_head = _new_head(model, info.get("missing_keys", ()), path, trainable)
    if cfg.disable_dropout:
        disable_dropout(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(dataclasses.replace(cfg, name_or_path=path)).pad_token_id
    if trainable and cfg.lora.r > 0:
        lora = peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                               target_modules=cfg.lora.target_modules, task_type="SEQ_CLS")
        model = peft.get_peft_model(model, lora)
    if new_head:
        logger.info("reward model %s: the score head (%s) starts from a random init (the checkpoint has none)",
                    path, new_head)
    return model.train() if trainable else _freeze(model)


def _no_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


def _new_head(model: PreTrainedModel, missing: Any, path: str, trainable: bool) -> str:
    """The score head's weights the checkpoint lacked (expected when a reward stage or critic starts from a causal
    LM); PrefoptError when a frozen reward model lacks them (its scores would be a random projection) or when the
    backbone itself is incomplete."""
    prefix = f"{model.base_model_prefix}."
    missing = sorted(missing)
    body = [key for key in missing if key.startswith(prefix)]
    if body:
        raise PrefoptError(f"reward model {path!r}: the checkpoint lacks {len(body)} backbone weights "
                           f"({', '.join(body[:3])}{', ...' if len(body) > 3 else ''}): not a model of this "
                           f"architecture, or saved incompletely")
    head = ", ".join(missing)
    if head and not trainable:
        raise PrefoptError(f"reward model {path!r} has no trained score head ({head} missing from its checkpoint: "
                           "a causal LM, not a reward model; its scores would come from a random projection); "
                           "train one with algorithm: reward and give its model/ directory")
    return head


def adapted(model: nn.Module) -> nn.Module:
    """The transformers model a peft wrapper adapts in place (``model`` itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off in ``model`` (before any adapter is added, so ``model.lora.dropout`` still applies).

    With dropout on, policy and reference log-probs of the same weights differ by noise (DPO at policy = reference
    is not log 2, KTO's KL estimate is not 0). TRL's helper zeroes every ``nn.Dropout``; attention dropout that
    Llama-style models read from a float attribute (``attention_dropout``) is zeroed too.
    """
    disable_dropout_in_model(model)
    for module in model.modules():
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; packed 4-bit weights count as the values they hold."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if param.__class__.__name__ == "Params4bit":  # two 4-bit values per byte of storage
            count *= 2 * param.element_size()
        total += count
        trainable += count if param.requires_grad else 0
    return trainable, total


def _weights_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    dtype = cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    return {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code, "use_safetensors": True}


def _quantization_kwargs(dtype: torch.dtype | str) -> dict[str, Any]:
    """NF4 4-bit weights; compute in float32 on CPU, in the weights dtype on a GPU (placed on this process's GPU)."""
    if not torch.cuda.is_available():
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32)
        return {"quantization_config": quantization}
    compute_dtype = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=compute_dtype)
    return {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}


def is_hub_id(source: str) -> bool:
    """True for a name that only the hub can mean: ``name`` or ``owner/name`` that is not on disk."""
    return bool(HUB_ID.fullmatch(source)) and not Path(source).expanduser().exists()


def model_source(source: str, what: str = "model.name_or_path") -> str:
    """Where a model (or tokenizer) comes from, decided at once: the absolute path of a local folder, or a hub id.

    A path that is not on disk is a hub id only when it can be nothing else: ``gpt2`` or ``owner/name`` whose first
    part is not a local folder. Anything else (``./x``, ``/x``, ``a/b/c``, or ``models/chat-bse`` when ``models/``
    exists) is a local folder that does not exist: PrefoptError saying so, naming the closest folder there, instead
    of trying the hub (with its retries, a minute or more). Adapters and cards record the absolute path, so a run
    started from a relative path loads from any directory.
    """
    path = Path(source).expanduser()
    if path.exists():
        return str(path.resolve())
    parent = path.parent
    if is_hub_id(source) and not (parent != Path(".") and parent.is_dir()):
        return source
    hint = ""
    if parent.is_dir():
        names = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
        close = closest(path.name, names)
        hint = (f"; did you mean {str(parent / close)!r}?" if close
                else f" ({parent} holds the folders: {', '.join(names[:8]) or 'none'})")
    raise PrefoptError(f"{what} {source!r}: the folder does not exist{hint} (not tried on the hub: a hub id is "
                       "'name' or 'owner/name' whose first part is not a local folder)")


def from_pretrained(auto_class: Any, source: str, what: str, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(source)`` with user-facing errors for empty, missing or unloadable sources."""
    if not source:
        raise PrefoptError(f"no {what} given: set model.name_or_path to a hub id or a local directory")
    where = model_source(source, f"{what} path")
    try:
        return auto_class.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as exc:  # missing files, unknown hub id, unrecognised config
        where = "the local directory" if Path(source).expanduser().exists() else "the hub (or the hub is unreachable)"
        hint = " (prefopt loads safetensors weights only)" if auto_class is not AutoTokenizer else ""
        if not Path(source).expanduser().exists() and "/" in source:  # a hub id that could have been a folder
            hint += f"; there is no folder {source!r} in {Path.cwd()} either"
        raise PrefoptError(f"cannot load {what} {source!r} from {where}{hint}: {' '.join(str(exc).split())}") from exc


def _freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model
