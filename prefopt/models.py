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
    tokenizer = _from_pretrained(AutoTokenizer, source, what, trust_remote_code=cfg.trust_remote_code)
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
    kwargs = _weights_kwargs(cfg)
    if cfg.load_in_4bit:
        kwargs.update(_quantization_kwargs(kwargs["dtype"]))
    model = _from_pretrained(AutoModelForCausalLM, source, "model", **kwargs)
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
    model = _from_pretrained(AutoModelForSequenceClassification, path, "reward model", num_labels=1,
                             **_weights_kwargs(cfg))
    if cfg.disable_dropout:
        disable_dropout(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(dataclasses.replace(cfg, name_or_path=path)).pad_token_id
    if trainable and cfg.lora.r > 0:
        lora = peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                               target_modules=cfg.lora.target_modules, task_type="SEQ_CLS")
        model = peft.get_peft_model(model, lora)
    return model.train() if trainable else _freeze(model)


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


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None) -> Path:
    """Fold a saved LoRA adapter into its (full-precision) base and save the result with its tokenizer.

    The base is ``base`` when given, else the one the adapter names (prefopt records it as an absolute path or a hub
    id; an adapter saved elsewhere with a relative path gets an error asking for ``--base``). An adapter trained on a
    4-bit base is merged into the unquantized base it was loaded from; a reward-model adapter (peft task type SEQ_CLS)
    is merged into a sequence-classification base with its score head. The adapter folder's model card and recipe
    are copied beside the merged weights.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise PrefoptError(f"no LoRA adapter in {str(adapter_dir)!r}: adapter_config.json is missing")
    adapter_config = peft.PeftConfig.from_pretrained(str(adapter_dir))
    named = adapter_config.base_model_name_or_path
    if base is None and named and not Path(named).is_absolute() and not is_hub_id(named):
        raise PrefoptError(f"the adapter in {str(adapter_dir)!r} names its base by the relative path {named!r} (relative "
                           "to where it was trained); give the base model with --base")
    base_path = model_source(base or named, "--base" if base else "the base model the adapter names")
    is_reward = str(adapter_config.task_type) in ("SEQ_CLS", "TaskType.SEQ_CLS")
    auto_class = AutoModelForSequenceClassification if is_reward else AutoModelForCausalLM
    extra = {"num_labels": 1} if is_reward else {}
    base_model = _from_pretrained(auto_class, base_path, "adapter base model", dtype=torch.float32,
                                  use_safetensors=True, **extra)
    merged = peft.PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_path
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tokenizer_source)))
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    from prefopt.export import copy_provenance

    copy_provenance(adapter_dir, out_dir, base_path)  # the model card and recipe go with the weights
    return out_dir


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


def _from_pretrained(auto_class: Any, source: str, what: str, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(source)`` with user-facing errors for empty, missing or unloadable sources."""
    if not source:
        raise PrefoptError(f"no {what} given: set model.name_or_path to a hub id or a local directory")
    where = model_source(source, f"{what} path")
    try:
        return auto_class.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as exc:  # missing files, unknown hub id, unrecognised config
        where = "the local directory" if Path(source).expanduser().exists() else "the hub (or the hub is unreachable)"
        hint = " (prefopt loads safetensors weights only)" if auto_class is not AutoTokenizer else ""
        raise PrefoptError(f"cannot load {what} {source!r} from {where}{hint}: {exc}") from exc


def _freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model
