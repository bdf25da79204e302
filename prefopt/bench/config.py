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
from prefopt.rl.engine import GenerationConfig

HH_PARTS = ("policy_train", "proxy_rm_train", "gold_rm_train", "eval")
SYNTHETIC_PARTS = ("policy_train", "eval")
WORLD_PARTS = ("policy_train", "val", "eval")


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
class WorldConfig:
    """The known-gold preference world (prefopt.bench.world; used when ``task: world``)."""

    num_prompts: int = 1500
    """Distinct prompts drawn (then split into policy_train / val / eval)."""
    seed: int = 0
    """Seed of the prompt draw and of the preference labels."""
    penalty: float = 0.0
    """lambda of the true reward r(x, y) = (min(own, T) - lambda * other) / T (0: the other groups' words are worth
    nothing; > 0 they cost)."""
    responses_per_prompt: int = 3
    """K: responses sampled from the start per labelled prompt, ranked by Plackett-Luce on r / label_temperature
    (equal r tied; the proxy RM trains on the K-wise rankings, offline algorithms on the pairs they imply)."""
    label_temperature: float = 0.05
    """tau: Bradley-Terry / Plackett-Luce label noise, P(a > b) = sigmoid((r(a) - r(b)) / tau)."""
    max_new_tokens: int = 12
    """T: the world's fixed response length, the true reward's denominator (the eval samples this many tokens)."""
    demonstrations: int = 6400
    """Rows of the start's world demonstrations (prefopt.bench.world.demonstrations: an HH reply with words of the
    prompt's group inserted), on prompts disjoint from the labelled and evaluated ones (0: none)."""
    demonstration_words: int = 4
    """Words of the prompt's group inserted into each demonstration."""

    def __post_init__(self):
        check(self.num_prompts > 0, "world.num_prompts", self.num_prompts, "must be > 0")
        check(self.penalty >= 0, "world.penalty", self.penalty, "must be >= 0")
        check(self.responses_per_prompt >= 2, "world.responses_per_prompt", self.responses_per_prompt, "must be >= 2")
        check(self.label_temperature > 0, "world.label_temperature", self.label_temperature, "must be > 0")
        check(self.max_new_tokens > 0, "world.max_new_tokens", self.max_new_tokens, "must be > 0")
        check(self.demonstrations >= 0, "world.demonstrations", self.demonstrations, "must be >= 0")
        check(self.demonstration_words >= 0, "world.demonstration_words", self.demonstration_words, "must be >= 0")


@dataclass
class FrontierConfig:
    """Frontiers, not points: every algorithm swept over its KL knob, evaluated at checkpoints along training."""

    knob_values: dict[str, list[float]] = field(default_factory=dict)
    """Label -> values of the algorithm's KL knob (its class attribute ``kl_knob``: beta, kl_coef, ...);
    a label not listed runs once at its recipe's value."""
    checkpoints: int = 4
    """Evaluations along training: at steps max_steps * i / checkpoints, i = 1..checkpoints."""
    best_of_n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """n of the best-of-n baseline (the start's n samples ranked by the proxy RM; analytic KL
    log n - (n - 1) / n); empty: no baseline."""
    kl_levels: list[float] = field(default_factory=list)
    """KL values (nats) at which algorithms are compared (interpolated along each frontier)."""
    bootstrap: int = 2000
    """Bootstrap resamples (seeds x prompts) of the paired comparisons and the 95% intervals."""
    flops_runs: int = 1
    """1: one short probe run per algorithm (its first run's recipe, 4 steps) has its FLOPs counted exactly
    (torch.utils.flop_counter, slow), and every run's FLOPs are its tokens x the probe's FLOPs per token;
    0: no probe, no FLOPs (nor compute-matched view)."""

    def __post_init__(self):
        check(self.checkpoints >= 1, "frontier.checkpoints", self.checkpoints, "must be >= 1")
        check(all(n >= 1 for n in self.best_of_n), "frontier.best_of_n", self.best_of_n, "every n must be >= 1")
        check(all(k > 0 for k in self.kl_levels), "frontier.kl_levels", self.kl_levels, "must be > 0")
        check(self.bootstrap >= 100, "frontier.bootstrap", self.bootstrap, "must be >= 100")
        check(self.flops_runs in (0, 1), "frontier.flops_runs", self.flops_runs, "must be 0 or 1")
        for label, values in self.knob_values.items():
            check(bool(values) and all(v >= 0 for v in values), f"frontier.knob_values.{label}", values,
                  "give one or more values >= 0")


@dataclass
class LRSweepConfig:
    """Per-algorithm learning rate chosen on the val split (never the eval prompts): one run per candidate at
    the middle value of the algorithm's KL knob, the candidate of highest val gold reward at the last step."""

    learning_rates: list[float] = field(default_factory=list)
    """Candidates (empty: no sweep, every algorithm uses its recipe's learning rate)."""
    seed: int = 1000
    """Training seed of the sweep runs (not one of the bench's seeds)."""

    def __post_init__(self):
        check(all(lr > 0 for lr in self.learning_rates), "lr_sweep.learning_rates", self.learning_rates, "must be > 0")


@dataclass
class DiagnosticsConfig:
    """Reward-hacking flags: each computed per run, flagged when it crosses its threshold."""

    gap_z: float = 1.0
    """Gold-proxy gap: (proxy - proxy_start) / sd_proxy - (gold - gold_start) / sd_gold above this (sd: the
    start's, over eval prompts)."""
    length_ratio: float = 1.5
    """Length drift: mean response length / the start's above this or below its inverse."""
    entropy_ratio: float = 0.5
    """Entropy collapse: mean token entropy / the start's below this."""
    kl_acceleration: float = 2.0
    """KL acceleration: KL growth per step over the last checkpoint interval / over the first above this
    (and the final KL above 1 nat)."""


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
    task: Literal["hh", "synthetic", "world"] = "hh"
    """hh: HH pairs, gold RM; synthetic: prefopt.tasks' prompts and known true reward; world: the known-gold
    preference world (prefopt.bench.world): labels from the true reward, a proxy RM trained on them."""
    reward: Literal["auto", "proxy_rm", "known"] = "auto"
    """What online algorithms optimise: the proxy RM (hh) or the known reward (synthetic); auto picks."""
    only: list[str] = field(default_factory=list)
    """Run only these algorithm labels (empty: all)."""
    threads: int = 0
    """CPU threads of every run and of the evaluation (OMP_NUM_THREADS, torch.set_num_threads); 0: torch's
    default. On a CPU shared with other jobs, 1 avoids the stalls of multi-threaded ops on oversubscribed cores."""
    isolation: Literal["inprocess", "subprocess"] = "inprocess"
    """Training runs in this process (seconds each at nano scale) or each in a ``prefopt train`` subprocess."""
    keep_checkpoints: bool = False
    """Keep the training checkpoints of finished runs (they are deleted to save disk by default)."""
    data: BenchDataConfig = field(default_factory=BenchDataConfig)
    """Source rows and token lengths."""
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    """The pinned split into disjoint parts."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """The known-reward task (task: synthetic)."""
    world: WorldConfig = field(default_factory=WorldConfig)
    """The known-gold preference world (task: world)."""
    frontier: FrontierConfig = field(default_factory=FrontierConfig)
    """KL-knob sweeps, checkpoints, best-of-n, matched-KL comparisons."""
    lr_sweep: LRSweepConfig = field(default_factory=LRSweepConfig)
    """Per-algorithm learning-rate sweep on the val split."""
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    """Reward-hacking thresholds."""
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
        check(not (self.task == "world" and self.reward == "known"), "reward", self.reward,
              "task world optimises its proxy RM (the true reward is the judge only)")
        check(not (self.task == "hh" and self.reward == "known"), "reward", self.reward,
              "task hh has no known reward; use proxy_rm")
        check(not (self.task == "synthetic" and self.reward == "proxy_rm"), "reward", self.reward,
              "task synthetic optimises the known reward")
        needed = {"hh": HH_PARTS, "synthetic": SYNTHETIC_PARTS, "world": WORLD_PARTS}[self.task]
        missing = [part for part in needed if not self.splits.fractions.get(part)]
        check(not missing, "splits.fractions", self.splits.fractions,
              f"task {self.task} needs parts {', '.join(needed)} with a fraction > 0 (missing: {missing})")
        if not self.output_dir:
            self.output_dir = str(Path("bench_runs") / self.name)
        for label, partial in self.algorithms.items():
            check(isinstance(partial, dict), f"algorithms.{label}", partial, "expected a partial recipe mapping")
        check(not (self.lr_sweep.learning_rates and self.task != "world"), "lr_sweep.learning_rates",
              self.lr_sweep.learning_rates, "the sweep is judged on the val prompts, which only task world has")
        unknown = [label for label in self.frontier.knob_values if label not in self.algorithms]
        check(not unknown, "frontier.knob_values", list(self.frontier.knob_values),
              f"unknown labels {unknown}; labels: {', '.join(self.algorithms)}")

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

