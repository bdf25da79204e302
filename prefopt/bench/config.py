"""Benchmark recipes: one dataclass per section, read from YAML with ``key=value`` overrides.

A bench recipe names the data and its pinned split, how the start (init -> pt -> sft) and the two reward
models are trained, the algorithms (each a PARTIAL ``prefopt train`` recipe merged over ``defaults``), the
seeds and the evaluation::

    name: hh_default
    seeds: [0, 1]
    data: {path: ${PREFOPT_HH_DIR:-../shared/data/hh-rlhf}, subsets: [harmless-base], split: test}
    splits: {fractions: {policy_train: 0.5, proxy_rm_train: 0.2, gold_rm_train: 0.2, eval: 0.1}}
    start: {init: {size: tiny}, pt: {train: {max_steps: 60}}, sft: {train: {max_steps: 60}}}
    reward_models: {proxy: {train: {max_steps: 60}}, gold: {train: {max_steps: 120}}}
    defaults: {train: {max_steps: 30, batch_size: 8}}
    algorithms:
      dpo: {algorithm: {beta: 0.1}}
      ppo: {algorithm: {kl_coef: 0.05}}
    eval: {num_prompts: 64, generation: {max_new_tokens: 32}}

Unknown keys and wrong types are errors naming the dotted key; every partial recipe is validated against the
algorithm's own Config when the recipe is loaded (``load_bench_config``), so a typo fails before any training.
Keys the bench owns (the start model, the training data, output_dir, seed) cannot be set in partial recipes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefopt.config import check, from_dict
from prefopt.recipe_file import expand_env, merge, parse_overrides, read_yaml
from prefopt.rollout import GenerationConfig

HH_PARTS = ("policy_train", "proxy_rm_train", "gold_rm_train", "eval")
SYNTHETIC_PARTS = ("policy_train", "eval")


@dataclass
class BenchDataConfig:
    """Where the bench's rows come from, and the token lengths every run and the evaluation use."""

    path: str = "${PREFOPT_HH_DIR:-../shared/data/hh-rlhf}"
    """HH-style directory (<subset>/<split>.jsonl.gz), a pairs file, or a hub dataset name."""
    subsets: list[str] = field(default_factory=lambda: ["harmless-base"])
    """HH subsets to read."""
    split: str = "test"
    """Split file to read (the local HH rows are a subset of the test split)."""
    format: str = "auto"
    """Row format (prefopt.data.formats); auto detects HH dialogues."""
    max_length: int = 192
    """Maximum prompt + response tokens of every run (a partial recipe may lower it for its own run)."""
    max_prompt_length: int = 128
    """Maximum prompt tokens (kept from the end of the prompt)."""

    def __post_init__(self):
        self.path = expand_env(self.path)
        check(self.max_length > 0, "data.max_length", self.max_length, "must be > 0")
        check(0 < self.max_prompt_length < self.max_length, "data.max_prompt_length", self.max_prompt_length,
              "must be in (0, data.max_length)")


@dataclass
class SplitsConfig:
    """The pinned split: each source row goes to a part by sha256(salt + row id) (prefopt.data.splits)."""

    salt: str = "prefopt-bench"
    """Salt of the hash; another salt draws another split."""
    fractions: dict[str, float] = field(default_factory=lambda: {
        "policy_train": 0.5, "proxy_rm_train": 0.2, "gold_rm_train": 0.2, "eval": 0.1})
    """Share of each part: policy_train (start + policies), proxy_rm_train, gold_rm_train, eval."""

    def __post_init__(self):
        total = sum(self.fractions.values())
        check(all(f >= 0 for f in self.fractions.values()) and abs(total - 1.0) < 1e-6, "splits.fractions",
              self.fractions, "must be >= 0 and sum to 1")


@dataclass
class SyntheticConfig:
    """The known-reward task of prefopt.tasks (used when ``task: synthetic``)."""

    num_prompts: int = 1024
    """Synthetic prompts drawn (repeats are dropped before the split)."""
    seed: int = 0
    """Seed of the prompt draw."""
    samples_per_prompt: int = 4
    """Offline pairs: responses sampled from the start per prompt; the best and worst under the true reward
    become chosen / rejected (ties dropped)."""

    def __post_init__(self):
        check(self.num_prompts > 0, "synthetic.num_prompts", self.num_prompts, "must be > 0")
        check(self.samples_per_prompt >= 2, "synthetic.samples_per_prompt", self.samples_per_prompt, "must be >= 2")


@dataclass
class InitConfig:
    """The tiny random-init base model built from the data (prefopt.tiny.init_model)."""

    arch: Literal["gpt2", "llama"] = "gpt2"
    """Architecture."""
    size: str = "tiny"
    """Named size (prefopt.tiny.SIZES: nano, tiny, small)."""
    vocab_size: int = 2048
    """Byte-level BPE vocabulary size."""
    seed: int = 0
    """Seed of the weights (and of the start's pt / sft / RM runs)."""
    max_texts: int | None = None
    """Documents of the corpus the tokenizer trains on (None: all)."""
    corpus: list[str] = field(default_factory=list)
    """Tokenizer corpus (files / HH dirs); default: the policy_train part (task hh) or data.path (synthetic)."""


@dataclass
class StartConfig:
    """The one start every algorithm trains from: init -> pt -> sft, each stage cached by hash."""

    model: str | None = None
    """An existing base model (hub id or directory) to use instead of building one with ``init``."""
    init: InitConfig = field(default_factory=InitConfig)
    """How the tiny base model is built."""
    pt: dict[str, Any] | None = field(default_factory=dict)
    """Partial recipe of the continued-pretraining stage (null: skip the stage)."""
    sft: dict[str, Any] | None = field(default_factory=dict)
    """Partial recipe of the SFT stage (null: skip the stage)."""


@dataclass
class RewardModelsConfig:
    """Partial recipes of the proxy RM (the online algorithms' reward) and the gold RM (evaluation only)."""

    proxy: dict[str, Any] = field(default_factory=dict)
    """Partial ``reward`` recipe, trained on the proxy_rm_train part."""
    gold: dict[str, Any] = field(default_factory=dict)
    """Partial ``reward`` recipe, trained on the disjoint gold_rm_train part."""


@dataclass
class EvalConfig:
    """The evaluation every policy gets: same prompts, same pairs, same sampling seed."""

    num_prompts: int = 64
    """Eval prompts sampled per policy (the first of the eval part in hash order)."""
    num_pairs: int = 128
    """Eval pairs for preference accuracy (the first of the eval part in hash order)."""
    batch_size: int = 16
    """Prompts / pairs per forward."""
    seed: int = 1234
    """Sampling seed: batch i is drawn with seed + i, for every policy (common random numbers)."""
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=32))
    """Sampling settings (also the online algorithms' training sampler unless their recipe sets one)."""
    samples_shown: int = 4
    """Prompts shown with every algorithm's response in samples.md."""

    def __post_init__(self):
        for key in ("num_prompts", "num_pairs", "batch_size"):
            check(getattr(self, key) > 0, f"eval.{key}", getattr(self, key), "must be > 0")
        check(self.samples_shown >= 0, "eval.samples_shown", self.samples_shown, "must be >= 0")


@dataclass
class BenchConfig:
    """A whole benchmark: data and splits, start, reward models, algorithms x seeds, evaluation."""

    name: str = "bench"
    """Name of the benchmark (default output directory bench_runs/<name>)."""
    output_dir: str = ""
    """The run directory (results, plots, manifest, runs/<algorithm>/seed<k>); default bench_runs/<name>."""
    cache_dir: str = "bench_runs/cache"
    """Where built starts and reward models are kept, one directory per stage hash, shared by benches."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Training seeds of every algorithm."""
    task: Literal["hh", "synthetic"] = "hh"
    """hh: HH pairs, gold RM; synthetic: prefopt.tasks' prompts and known true reward."""
    reward: Literal["auto", "proxy_rm", "known"] = "auto"
    """What online algorithms optimise: the proxy RM (hh) or the known reward (synthetic); auto picks."""
    only: list[str] = field(default_factory=list)
    """Run only these algorithm labels (empty: all)."""
    threads: int = 0
    """CPU threads of every run and of the evaluation (OMP_NUM_THREADS, torch.set_num_threads); 0: torch's
    default. On a CPU shared with other jobs, 1 avoids the stalls of multi-threaded ops on oversubscribed cores."""
    keep_checkpoints: bool = False
    """Keep the training checkpoints of finished runs (they are deleted to save disk by default)."""
    data: BenchDataConfig = field(default_factory=BenchDataConfig)
    """Source rows and token lengths."""
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    """The pinned split into disjoint parts."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """The known-reward task (task: synthetic)."""
    start: StartConfig = field(default_factory=StartConfig)
    """The shared start."""
    reward_models: RewardModelsConfig = field(default_factory=RewardModelsConfig)
    """Proxy and gold reward models (task: hh)."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Partial recipe merged under every algorithm's (the shared budget: train.max_steps, batch_size, ...)."""
    algorithms: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Label -> partial recipe; algorithm.name defaults to the label (so dpo_ipo: {algorithm: {name: dpo}})."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """The shared evaluation."""

    def __post_init__(self):
        check(bool(self.seeds), "seeds", self.seeds, "give at least one seed")
        check(len(set(self.seeds)) == len(self.seeds), "seeds", self.seeds, "seeds repeat")
        check(self.threads >= 0, "threads", self.threads, "must be >= 0 (0: torch's default)")
        check(bool(self.algorithms), "algorithms", self.algorithms, "give at least one algorithm")
        unknown = [label for label in self.only if label not in self.algorithms]
        check(not unknown, "only", self.only, f"unknown labels {unknown}; labels: {', '.join(self.algorithms)}")
        if self.reward == "auto":
            self.reward = "known" if self.task == "synthetic" else "proxy_rm"
        check(not (self.task == "hh" and self.reward == "known"), "reward", self.reward,
              "task hh has no known reward; use proxy_rm")
        check(not (self.task == "synthetic" and self.reward == "proxy_rm"), "reward", self.reward,
              "task synthetic optimises the known reward")
        needed = HH_PARTS if self.task == "hh" else SYNTHETIC_PARTS
        missing = [part for part in needed if not self.splits.fractions.get(part)]
        check(not missing, "splits.fractions", self.splits.fractions,
              f"task {self.task} needs parts {', '.join(needed)} with a fraction > 0 (missing: {missing})")
        if not self.output_dir:
            self.output_dir = str(Path("bench_runs") / self.name)
        for label, partial in self.algorithms.items():
            check(isinstance(partial, dict), f"algorithms.{label}", partial, "expected a partial recipe mapping")

    @property
    def labels(self) -> list[str]:
        """The algorithm labels this run trains, in recipe order."""
        return [label for label in self.algorithms if not self.only or label in self.only]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_bench_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> BenchConfig:
    """Read a bench recipe, apply ``key=value`` overrides (``defaults.train.max_steps=5``, ``seeds=[0]``),
    validate every section and every partial recipe (against the named algorithm's Config)."""
    data = read_yaml(path) if path else {}
    for label, partial in (data.get("algorithms") or {}).items():
        if partial is None:
            data["algorithms"][label] = {}
    data = merge(data, parse_overrides(list(overrides)))
    if "name" not in data and path:
        data["name"] = Path(path).stem
    cfg = from_dict(BenchConfig, data, "")
    from prefopt.bench.recipes import validate_recipes

    validate_recipes(cfg)
    return cfg

