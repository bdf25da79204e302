"""Run configuration: one dataclass per section, a YAML recipe, and ``section.key=value`` overrides.

A recipe looks like::

    algorithm: {name: dpo, beta: 0.1, loss: sigmoid}
    model: {name_or_path: runs/sft}
    data: {path: ../shared/data/hh-rlhf, subsets: [harmless-base]}
    train: {max_steps: 200, batch_size: 8, learning_rate: 5.0e-5}

The ``algorithm`` section is validated against the Config dataclass the named algorithm declares. Unknown keys
and wrong types are errors naming the key (with the closest known key); range checks live in each dataclass's
``__post_init__``; a NaN or infinite number is refused anywhere. ``${VAR}`` and ``${VAR:-default}`` are expanded
after YAML parsing, inside scalar string values only; an unset variable without a default is an error, and so is a
key given twice in one mapping. Checks that need the model's own config (its context length, whether a reward
model has a score head) run at build time in ``prefopt.preflight``.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefopt.chat_templates import TEMPLATES
from prefopt.errors import ConfigError
from prefopt.fields import check, describe_fields, from_dict  # noqa: F401 (the config's own reader, re-exported)
from prefopt.recipe_file import explain_env, merge, parse_overrides, read_yaml
from prefopt.registry import closest
from prefopt.rundir import check_output_dir, flatten


@dataclass
class LoraConfig:
    """LoRA adapter settings (peft). Used when ``model.lora.r > 0``."""

    r: int = 0
    """Adapter rank; 0 disables LoRA."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or "all-linear"."""

    def __post_init__(self):
        check(self.r >= 0, "model.lora.r", self.r, "must be >= 0")


@dataclass
class LogitsConfig:
    """How the LM head's log-probs are computed without its [tokens, vocab] logits (prefopt.lm_head)."""

    chunk: int = 256
    """Positions whose logits are computed at once (forward and backward)."""
    vocab_block: int = 4096
    """Vocabulary entries per block (CPU, float32 Linear heads; elsewhere whole rows)."""
    keep_mb: float = 128.0
    """MB of float32 logits a call keeps for its backward: all if they fit, else none (each block recomputed)."""

    def __post_init__(self):
        check(self.chunk >= 1, "model.logits.chunk", self.chunk, "must be >= 1")
        check(self.vocab_block >= 1, "model.logits.vocab_block", self.vocab_block, "must be >= 1")
        check(self.keep_mb >= 0, "model.logits.keep_mb", self.keep_mb, "must be >= 0")


@dataclass
class ModelConfig:
    """Which model to start from and how to load it."""

    name_or_path: str = ""
    """Hub id or local directory of the starting (policy) model."""
    tokenizer: str | None = None
    """Tokenizer hub id or directory; defaults to name_or_path."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Weights dtype when loading."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the hub. Off unless set."""
    load_in_4bit: bool = False
    """QLoRA: load the base in 4-bit through bitsandbytes (needs lora.r > 0)."""
    gradient_checkpointing: bool = False
    """Trade compute for memory in the policy forward."""
    disable_dropout: bool = True
    """Turn the model's dropout off (policy, reference, reward and value models; as TRL's disable_dropout). The
    LoRA adapter's own dropout is model.lora.dropout."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapter settings."""
    logits: LogitsConfig = field(default_factory=LogitsConfig)
    """Chunking of the LM head's log-probs: peak memory of the head vs one recomputed matmul."""

    def __post_init__(self):
        check(not self.load_in_4bit or self.lora.r > 0, "model.load_in_4bit", True, "needs model.lora.r > 0 (QLoRA)")


@dataclass
class DataSource:
    """One of several data sources of a run (``data.sources``), mixed by weight."""

    path: str = ""
    """A file, a directory or a hub dataset name, as data.path."""
    weight: float = 1.0
    """How many times its training rows are taken: 2 (each twice), 0.5 (half of them, in hash order), 1 (as they are)."""
    format: str = "auto"
    """Row format, as data.format."""
    split: str = "train"
    """Split to read, as data.split."""
    subsets: list[str] | None = None
    """Sub-directories to read, as data.subsets."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column map {name in this source: name prefopt reads}, e.g. {question: prompt, answer: completion}."""

    def __post_init__(self):
        check(bool(self.path), "data.sources[].path", self.path, "must name a file, a directory or a hub dataset")
        check(self.weight > 0, "data.sources[].weight", self.weight, "must be > 0")


@dataclass
class DataConfig:
    """Where the data comes from and how it is split and truncated."""

    path: str = ""
    """A file (.jsonl/.json[.gz], .csv, .parquet, .arrow, .txt), a directory (HH <subset>/<split>.jsonl.gz,
    Dataset.save_to_disk or a hub snapshot), or a hub dataset name; see prefopt.data.readers."""
    format: str = "auto"
    """Row format (prefopt.data.formats): auto, or one of hh, pairs, messages, ultrafeedback, ultrafeedback_raw,
    conversations, alpaca, sft, text, ranks, unpaired, prompts."""
    subsets: list[str] | None = None
    """Sub-directories to read (hub data_dir); None: ["harmless-base"] for HH-RLHF, none for other data."""
    split: str = "train"
    """Split to read: the file / hub split name (HH: train or test; UltraFeedback-binarized: train_prefs, ...)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column map of data.path {name in the file: name prefopt reads}, e.g. {question: prompt, answer: completion}."""
    sources: list[DataSource] = field(default_factory=list)
    """Several sources instead of data.path, each with its weight, format, split and column map (mixed after the
    split: the held-out rows of every source are evaluated as they are)."""
    chat_template: str = "auto"
    """Conversational rows: "auto" (the tokenizer's chat template; an error if it has none), "none" (HH text on
    purpose), "chatml" or "llama3" (built in), or a Jinja template file; a named or file template is saved with the
    model."""
    assistant_turns: Literal["all", "last"] = "all"
    """SFT on conversations: every assistant turn carries loss (all: TRL's assistant_only_loss) or only the last."""
    packing: bool = False
    """SFT: pack examples into max_length sequences (best fit, TRL's bfd); each keeps its positions and attends
    only to itself. train.batch_size then counts packed sequences."""
    eval_fraction: float = 0.1
    """Fraction of rows held out for evaluation, chosen by a stable content hash."""
    split_salt: str = "prefopt"
    """Salt of the content hash; change it to draw a different pinned split."""
    max_examples: int | None = None
    """Use at most this many training rows (after the split), in hash order."""
    max_length: int = 512
    """Maximum prompt+response tokens; longer rows are truncated (prompt from the left)."""
    max_prompt_length: int = 256
    """Maximum prompt tokens (kept from the end of the prompt)."""
    text_path: str | None = None
    """Extra plain-text file (one document per line) for pt / PPO-ptx streams."""
    length_bucketing: bool = True
    """Batch rows of similar length together (less padding); the batch order is still shuffled."""

    def __post_init__(self):
        check(not (self.sources and self.path), "data.sources", "[...]", "give data.path or data.sources, not both")
        check(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction, "must be in [0, 1)")
        check(self.max_length > 0, "data.max_length", self.max_length, "must be > 0")
        check(0 < self.max_prompt_length <= self.max_length, "data.max_prompt_length", self.max_prompt_length,
              "must be in (0, data.max_length]")
        check(self.max_examples is None or self.max_examples > 0, "data.max_examples", self.max_examples, "must be > 0")
        names = ("auto", "none", *TEMPLATES)
        check(self.chat_template in names or Path(self.chat_template).expanduser().is_file(),
              "data.chat_template", self.chat_template, f"must be {', '.join(names)} or an existing template file")


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing, shared by every algorithm."""

    output_dir: str = "runs/default"
    """Directory for checkpoints, metrics, the final model and the data manifest."""
    seed: int = 0
    """Seed for torch, numpy, python and data order."""
    max_steps: int = 100
    """Optimizer-update rounds (one batch of the algorithm's kind each); ignored when train.epochs is set."""
    epochs: float | None = None
    """Passes over the training data (may be fractional); sets max_steps = ceil(epochs x steps per epoch)."""
    batch_size: int = 8
    """Rows per batch per process (pairs, prompts, sequences)."""
    eval_batch_size: int = 16
    """Rows per evaluation batch."""
    gradient_accumulation_steps: int = 1
    """Batches whose gradients are summed before one optimizer step."""
    learning_rate: float = 5e-5
    """Peak learning rate."""
    optimizer: Literal["adamw", "adamw_fused", "adamw_8bit", "adafactor"] = "adamw_fused"
    """torch AdamW's fused kernel or its multi-tensor one, bitsandbytes' 8-bit AdamW, Adafactor (prefopt.optim)."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's (beta1, beta2)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (>= 0)."""
    warmup_steps: int = 0
    """Linear warm-up over this many steps (the lr moves at every optimizer update, several per step online)."""
    lr_scheduler: str = "constant_with_warmup"
    """transformers scheduler name: constant_with_warmup, constant, linear, cosine, polynomial, ..."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "auto"
    """accelerate mixed precision; auto = bf16 on a GPU that has it, else no."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    max_eval_batches: int | None = None
    """Cap on evaluation batches (None: the whole eval split)."""
    log_every: int = 10
    """Write metrics every N steps."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end and on interruption)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept on disk."""
    resume: str | bool = "no"
    """"auto": continue the same run from its newest usable checkpoint in output_dir; "no"; or a checkpoint path."""
    overwrite: bool = False
    """Clear an output_dir that holds an earlier run before starting: exactly the files its ledger lists."""
    accept_changed_data: bool = False
    """Resume although a data file changed since the checkpoint (its saved position then points into other rows)."""
    on_nonfinite: Literal["skip", "stop"] = "stop"
    """What to do when the loss or gradient is NaN/inf: skip the update, or stop (exit code 3)."""
    max_skipped_updates: int = 10
    """With on_nonfinite=skip: stop (exit code 3) after this many consecutive skipped updates."""
    report_to: list[str] = field(default_factory=list)
    """accelerate trackers (tensorboard, wandb, mlflow, ...) in addition to the CSV/JSONL metrics always written."""
    progress: bool = True
    """Show a tqdm progress bar (a console line is printed every log_every steps either way)."""
    save_model: bool = True
    """Save the final model to output_dir/model."""
    push_to_hub: str | None = None
    """Hub repo id ("owner/name") to upload output_dir/model to at the end (huggingface_hub; needs a token)."""
    hub_private: bool = True
    """Create that hub repo private."""

    def __post_init__(self):
        check_output_dir(self.output_dir)
        check(0 <= self.seed < 2**32, "train.seed", self.seed, "must be in [0, 2**32)")
        for key in ("max_steps", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "log_every"):
            check(getattr(self, key) > 0, f"train.{key}", getattr(self, key), "must be > 0")
        check(self.learning_rate >= 0, "train.learning_rate", self.learning_rate, "must be >= 0")
        check(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, "must be >= 0")
        check(self.keep_checkpoints > 0, "train.keep_checkpoints", self.keep_checkpoints, "must be > 0")
        check(self.max_skipped_updates > 0, "train.max_skipped_updates", self.max_skipped_updates, "must be > 0")
        for key in ("eval_every", "save_every", "warmup_steps", "weight_decay"):
            check(getattr(self, key) >= 0, f"train.{key}", getattr(self, key), "must be >= 0")
        check(self.epochs is None or self.epochs > 0, "train.epochs", self.epochs, "must be > 0 (or null: max_steps)")
        check(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "train.adam_betas",
              self.adam_betas, "must be two numbers in [0, 1)")
        check(self.push_to_hub is None or self.save_model, "train.push_to_hub", self.push_to_hub,
              "uploads output_dir/model: needs train.save_model=true")
        check(self.max_eval_batches is None or self.max_eval_batches > 0, "train.max_eval_batches",
              self.max_eval_batches, "must be > 0 (or null: the whole eval split)")
        from transformers import SchedulerType

        schedulers = [s.value for s in SchedulerType]
        hint = closest(self.lr_scheduler, schedulers)
        check(self.lr_scheduler in schedulers, "train.lr_scheduler", self.lr_scheduler,
              f"unknown scheduler{f'; did you mean {hint!r}?' if hint else ''} Known: {', '.join(schedulers)}")
        if self.resume is False:  # YAML 1.1 reads a bare `no` as false
            self.resume = "no"
        check(isinstance(self.resume, str), "train.resume", self.resume, "must be auto, no, or a checkpoint directory")
        if self.resume not in ("auto", "no") and not Path(self.resume).exists():
            hint = closest(self.resume, ["auto", "no"])
            check(False, "train.resume", self.resume, "not a complete checkpoint (no such directory); use auto, no, "
                  "or a checkpoints/step-N directory" + (f"; did you mean {hint!r}?" if hint else ""))


@dataclass
class RunConfig:
    """A whole recipe: algorithm (with its own Config), model, data, train."""

    algorithm: Any
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_data: DataConfig | None = None
    """Optional separate evaluation data (else the held-out split of ``data``)."""

    @property
    def algorithm_name(self) -> str:
        return self.algorithm.registry_name

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["algorithm"] = {"name": self.algorithm_name, **dataclasses.asdict(self.algorithm)}
        return out


MAX_COEF = 1e3  # the largest KL / preference strength (beta) a recipe may set
TOO_STRONG = (f"must be <= {MAX_COEF:g}: it multiplies log-ratios, so a larger one only makes the loss overflow "
              "(typical values are 0.01 to 1)")


def build_run_config(data: dict[str, Any], where: str = "recipe") -> RunConfig:
    """Validate a recipe dict (after overrides) into a RunConfig."""
    from prefopt.registry import ALGORITHMS

    data = dict(data)
    algo = data.pop("algorithm", None)
    if isinstance(algo, str):
        algo = {"name": algo}
    if not isinstance(algo, dict) or "name" not in algo:
        raise ConfigError(f"{where}: 'algorithm' must be a mapping with a 'name' (see `prefopt list`)")
    algo = dict(algo)
    algo_cls = ALGORITHMS.get(str(algo.pop("name")))
    algorithm = from_dict(algo_cls.Config, algo, "algorithm")
    algorithm.registry_name = algo_cls.registry_name
    known = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval_data": DataConfig}
    sections = {}
    for key, value in data.items():
        if key not in known:
            hint = closest(key, list(known) + ["algorithm"])
            raise ConfigError(f"{where}: unknown section {key!r}" + (f"; did you mean {hint!r}?" if hint else ".")
                              + " Sections: algorithm, model, data, eval_data, train")
        # an empty section is its defaults; no eval_data (null, as a saved recipe writes it) is none
        sections[key] = None if key == "eval_data" and value is None else from_dict(known[key], value or {}, key)
    run = RunConfig(algorithm=algorithm, **sections)
    algo_cls.check_run(run)  # combinations the algorithm cannot run are refused here, not mid-run
    return run


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML recipe (or none), apply ``section.key=value`` overrides, validate.

    The recipe's directory and the working directory become importable first (as ``python script.py`` makes the
    script's), so a reward module beside the recipe or where the command runs is found by ``"module:function"``."""
    for folder in ([Path(path).resolve().parent] if path else []) + [Path.cwd()]:
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    sources: dict[str, str] = {}  # keys whose value a ${VAR} gave, for the error messages
    data = read_yaml(path, sources) if path else {}
    if isinstance(data.get("algorithm"), str):
        data["algorithm"] = {"name": data["algorithm"]}
    given = parse_overrides(list(overrides))
    data = merge(data, given)
    sources = {key: source for key, source in sources.items() if key not in flatten(given)}
    try:
        return build_run_config(data, where=str(path or "overrides"))
    except ConfigError as exc:
        raise ConfigError(explain_env(str(exc), sources)) from None
