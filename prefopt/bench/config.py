"""The bench config: one dataclass per section of a bench recipe (reading and validating one is prefopt.bench.recipes).

A bench recipe names the data and its pinned split, the start (init -> pt -> sft) and the reward models, the
algorithms (each a PARTIAL ``prefopt train`` recipe merged over ``defaults``), the replicates (world draws x
seeds), the selection of the learning rate and the KL knob on the val prompts, and the evaluation::

    name: world_default
    task: world
    draws: 3
    seeds: [0, 1, 2, 3]
    world: {num_prompts: 1500}
    start: {init: {size: nano}, sft: {data: {path: ...}, train: {max_steps: 60}}}
    reward_models: {proxy: {train: {max_steps: 60}}}
    defaults: {train: {max_steps: 24, batch_size: 16}}
    algorithms: {ppo: {algorithm: {epochs: 1}}, dpo: {}}
    oracles: [ppo]
    select: {learning_rates: [1.0e-3, 3.0e-3, 1.0e-2], seeds: [1000]}
    frontier: {knob_values: {ppo: [0.01, 0.05, 0.2], dpo: [0.05, 0.1, 0.5]}, checkpoints: 8}
    eval: {num_prompts: 128, generation: {max_new_tokens: 12}}

Every field has a one-line docstring; ``__post_init__`` checks what one section can check alone (errors name the
dotted key). The recipes every section implies are validated by prefopt.bench.recipes.load_bench.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefopt.config import check
from prefopt.recipe_file import expand_env
from prefopt.rl.engine import GenerationConfig

PARTS = {"world": ("policy_train", "val", "eval"),
         "hh": ("policy_train", "proxy_rm_train", "gold_rm_train", "val", "eval")}
"""The disjoint parts each task needs (prefopt.bench.data)."""


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
        "policy_train": 0.3, "proxy_rm_train": 0.15, "gold_rm_train": 0.25, "val": 0.05, "eval": 0.25})
    """Share of each part (task hh: policy_train, proxy_rm_train, gold_rm_train, val, eval; world:
    policy_train, val, eval)."""

    def __post_init__(self):
        total = sum(self.fractions.values())
        check(all(f >= 0 for f in self.fractions.values()) and abs(total - 1.0) < 1e-6, "splits.fractions",
              self.fractions, "must be >= 0 and sum to 1")


@dataclass
class WorldConfig:
    """The known-gold preference world (prefopt.bench.world; used when ``task: world``)."""

    num_prompts: int = 1500
    """Distinct prompts drawn (then split into policy_train / val / eval)."""
    seed: int = 0
    """Seed of the prompt draw; world draw d labels with seed ``seed + 1 + d``."""
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
class InitConfig:
    """The tiny random-init base model built from the data (prefopt.tiny.init_model)."""

    arch: Literal["gpt2", "llama"] = "gpt2"
    """Architecture."""
    size: str = "tiny"
    """Named size (prefopt.tiny.SIZES: nano, tiny, small)."""
    vocab_size: int = 2048
    """Byte-level BPE vocabulary size."""
    seed: int = 0
    """Seed of the weights (and of the start's pt / sft runs and the gold RM)."""
    max_texts: int | None = None
    """Documents of the corpus the tokenizer trains on (None: all)."""
    corpus: list[str] = field(default_factory=list)
    """Tokenizer corpus (files / HH dirs); default: the policy_train dialogues (hh) or data.path (world)."""


@dataclass
class StartConfig:
    """The one start every algorithm trains from: init -> pt -> sft, each stage cached by content."""

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
    """Partial recipes of the proxy RM (the online algorithms' reward) and the gold RM (hh evaluation only)."""

    proxy: dict[str, Any] = field(default_factory=dict)
    """Partial ``reward`` recipe: world: the draw's policy_train rankings; hh: the proxy_rm_train part."""
    gold: dict[str, Any] = field(default_factory=dict)
    """Partial ``reward`` recipe of the hh gold RM, trained on the disjoint gold_rm_train part."""


@dataclass
class SelectConfig:
    """The learning rate, then the KL-knob value, of every label chosen on the val prompts (never the eval ones)
    by runs with their own seeds: first each rate at the middle knob value, then each knob value at the chosen
    rate; the setting of highest mean val gold at the last step (among those within ``kl_budget``) wins. A
    choice on the edge of its grid extends the grid one step beyond it (``extend`` times), then is flagged."""

    learning_rates: list[float] = field(default_factory=list)
    """Learning-rate grid (empty: no selection; every label runs at its recipe's rate and its middle knob)."""
    seeds: list[int] = field(default_factory=lambda: [999])
    """Training seeds of the selection runs (never one of the main runs' training seeds)."""
    draw: int = 0
    """The world draw (labels + proxy RM) the selection runs train on."""
    extend: int = 1
    """Extensions of a grid whose best value sits on its edge (0: only flag it)."""
    kl_budget: float | None = None
    """Only settings whose mean val KL at the last step is <= this compete (None: all)."""

    def __post_init__(self):
        check(all(lr > 0 for lr in self.learning_rates), "select.learning_rates", self.learning_rates, "must be > 0")
        check(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), "select.seeds", self.seeds,
              "give distinct seeds")
        check(self.draw >= 0, "select.draw", self.draw, "must be >= 0")
        check(self.extend >= 0, "select.extend", self.extend, "must be >= 0")


@dataclass
class FrontierConfig:
    """Frontiers, not points: every algorithm over its KL knob, evaluated at checkpoints along training."""

    knob_values: dict[str, list[float]] = field(default_factory=dict)
    """Label -> values of the algorithm's KL knob (beta, kl_coef, ...; prefopt.bench.recipes.knob_field); a label
    not listed runs at its recipe's value."""
    checkpoints: int = 8
    """Evaluations along training, log-spaced (dense early) from step 1 to the last step."""
    best_of_n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256])
    """n of the best-of-n baselines from the start (ranked by the proxy RM and by the gold); empty: none."""
    kl_levels: list[float] = field(default_factory=list)
    """KL values (nats) at which the report compares algorithms."""
    flops_probe: bool = True
    """One short run per label (its first main recipe, 4 steps) has its FLOPs counted (torch.utils.flop_counter);
    every run's FLOPs are then its tokens x that probe's FLOPs per token."""

    def __post_init__(self):
        check(self.checkpoints >= 1, "frontier.checkpoints", self.checkpoints, "must be >= 1")
        check(all(n >= 1 for n in self.best_of_n), "frontier.best_of_n", self.best_of_n, "every n must be >= 1")
        check(all(k > 0 for k in self.kl_levels), "frontier.kl_levels", self.kl_levels, "must be > 0")
        for label, values in self.knob_values.items():
            check(bool(values) and all(v >= 0 for v in values), f"frontier.knob_values.{label}", values,
                  "give one or more values >= 0")


@dataclass
class BudgetConfig:
    """Equal footing: what every run is given (the report's budget table states what each one used)."""

    epochs: float = 1.0
    """Offline algorithms (pairs, unpaired, ranks) train this many epochs over ALL labelled rows of their draw
    (their ``train.max_steps`` is derived from the row count); >= 1."""

    def __post_init__(self):
        check(self.epochs >= 1.0, "budget.epochs", self.epochs, "offline algorithms see every labelled pair: >= 1")


@dataclass
class EvalConfig:
    """The evaluation every policy gets: same prompts, same pairs, same sampling seeds."""

    num_prompts: int = 128
    """Prompts of each set (val, eval) sampled per policy (the first distinct ones of the part in hash order)."""
    num_pairs: int = 128
    """Held-out pairs (eval part) for the implicit-reward preference accuracy; hh: >= 500 also judge the RMs."""
    batch_size: int = 128
    """Prompts / pairs per forward."""
    seed: int = 1234
    """Sampling seed: batch b of a set is drawn with seed + b (val: + 100000) for every policy."""
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=12))
    """Sampling settings (also the online algorithms' training sampler unless their recipe sets one); world: its
    max_new_tokens is the world's T."""

    def __post_init__(self):
        for key in ("num_prompts", "num_pairs", "batch_size"):
            check(getattr(self, key) > 0, f"eval.{key}", getattr(self, key), "must be > 0")


@dataclass
class BenchConfig:
    """A whole benchmark: data and splits, start, reward models, algorithms x knob values x draws x seeds."""

    name: str = "bench"
    """Name of the benchmark (default output directory bench_runs/<name>)."""
    output_dir: str = ""
    """The run directory (the layout of prefopt.bench.files); default bench_runs/<name>."""
    cache_dir: str = "bench_runs/cache"
    """Where built stages (start, labels, reward models) are kept, one directory per content key."""
    task: Literal["world", "hh"] = "world"
    """world: the known-gold world (prefopt.bench.world): labels from the true reward, a proxy RM trained on them;
    hh: HH-RLHF pairs, a proxy RM and a gold RM trained on disjoint parts."""
    draws: int = 3
    """World draws (the outer replicate): labels and proxy RM drawn again with their own seed (hh: the proxy RM)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Training seeds per draw: run (draw d, seed s) trains with seed s + 1000 d."""
    only: list[str] = field(default_factory=list)
    """Run only these algorithm labels (empty: all)."""
    threads: int = 1
    """torch threads of every process (0: torch's default); 1 per worker on a shared CPU."""
    workers: int = 2
    """Processes that train and evaluate runs side by side (results are bit-identical to 1 worker)."""
    keep_checkpoints: bool = False
    """Keep the training checkpoints and models of finished runs (deleted to save disk by default)."""
    data: BenchDataConfig = field(default_factory=BenchDataConfig)
    """Source rows and token lengths."""
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    """The pinned split into disjoint parts."""
    world: WorldConfig = field(default_factory=WorldConfig)
    """The known-gold preference world (task: world)."""
    start: StartConfig = field(default_factory=StartConfig)
    """The shared start."""
    reward_models: RewardModelsConfig = field(default_factory=RewardModelsConfig)
    """Proxy and gold reward models."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Partial recipe merged under every algorithm's (the shared budget: train.max_steps, batch_size, ...)."""
    algorithms: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Label -> partial recipe; algorithm.name defaults to the label (so dpo_ipo: {algorithm: {name: dpo}})."""
    oracles: list[str] = field(default_factory=list)
    """Labels of online algorithms that also run on the TRUE reward (world), as label ``<label>_true``."""
    select: SelectConfig = field(default_factory=SelectConfig)
    """Learning-rate and KL-knob selection on the val prompts."""
    frontier: FrontierConfig = field(default_factory=FrontierConfig)
    """KL-knob values, checkpoints, best-of-n, comparison levels."""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    """Equal footing of the offline algorithms."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """The shared evaluation."""

    def __post_init__(self):
        check(self.draws >= 1, "draws", self.draws, "must be >= 1")
        check(bool(self.seeds) and min(self.seeds) >= 0, "seeds", self.seeds, "give one or more seeds >= 0")
        check(len(set(self.seeds)) == len(self.seeds), "seeds", self.seeds, "seeds repeat")
        check(max(self.seeds) < 1000, "seeds", self.seeds, "must be < 1000 (draw d trains with seed + 1000 d)")
        taken = sorted(set(self.select.seeds) & set(self.train_seeds()))
        check(not taken, "select.seeds", self.select.seeds, f"{taken} also train main runs; choose others")
        check(self.select.draw < self.draws, "select.draw", self.select.draw, f"must be < draws ({self.draws})")
        check(self.threads >= 0, "threads", self.threads, "must be >= 0 (0: torch's default)")
        check(self.workers >= 1, "workers", self.workers, "must be >= 1")
        check(bool(self.algorithms), "algorithms", self.algorithms, "give at least one algorithm")
        for label, partial in self.algorithms.items():
            check(isinstance(partial, dict), f"algorithms.{label}", partial, "expected a partial recipe mapping")
        for key, labels in (("only", self.only), ("oracles", self.oracles),
                            ("frontier.knob_values", list(self.frontier.knob_values))):
            unknown = [label for label in labels if label not in self.algorithms]
            check(not unknown, key, labels, f"unknown labels {unknown}; labels: {', '.join(self.algorithms)}")
        check(not (self.oracles and self.task != "world"), "oracles", self.oracles,
              "an oracle optimises the true reward, which only task world has")
        check(self.task != "world" or self.eval.generation.max_new_tokens == self.world.max_new_tokens,
              "eval.generation.max_new_tokens", self.eval.generation.max_new_tokens,
              f"the world's true reward is per budget T = world.max_new_tokens ({self.world.max_new_tokens}): "
              "sample that many tokens")
        missing = [part for part in PARTS[self.task] if not self.splits.fractions.get(part)]
        check(not missing, "splits.fractions", self.splits.fractions,
              f"task {self.task} needs parts {', '.join(PARTS[self.task])} with a fraction > 0 (missing: {missing})")
        if not self.output_dir:
            self.output_dir = str(Path("bench_runs") / self.name)

    @property
    def labels(self) -> list[str]:
        """The algorithm labels this bench trains, in recipe order."""
        return [label for label in self.algorithms if not self.only or label in self.only]

    def train_seeds(self) -> list[int]:
        """Every main / oracle run's training seed: seed + 1000 draw."""
        return [seed + 1000 * draw for draw in range(self.draws) for seed in self.seeds]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
