"""prefopt vs TRL 1.16, side by side: DPO, ORPO and reward modelling on the same model, batches and dtype.

    python benchmarks/vs_trl.py                      # fp32 and bf16 runs, ablations, memory: the full table
    python benchmarks/vs_trl.py --dtypes fp32 --algorithms dpo --steps 6 --no-memory    # a quick look

Protocol. The model is the tiny GPT-2 of ``prefopt.tiny`` (4 layers, width 256, byte-level BPE 4096 trained on
the HH text; built into ``--work`` on first use). Pairs are the HH-RLHF harmless-base rows of ../shared/data,
tokenized once by prefopt (prompt cut from the left to 256 tokens, prompt + response <= ``--max-length`` 384),
shuffled with a fixed seed and cut into batches of 8 pairs. Both libraries get exactly these token ids in exactly
this batch order: TRL's train set is the same rows, read sequentially, and a collator hands TRL the same ids
(TRL's own DataCollatorForPreference for DPO and RewardTrainer, the ORPO tensors for ORPOTrainer); the first
batches are checked to be equal tensors.

Every contestant is a real training loop in its own thread: ``prefopt.trainer.Trainer.fit`` for ours,
``trainer.train()`` for TRL. A baton lets exactly one thread run at a time, one optimizer step each in turn, so
all contestants of a run see the same machine load; a step is timed from its start to the end of its optimizer
update (TRL: ``on_step_begin`` to ``on_step_end``; ours: ``Trainer._train_step``). The first ``--warmup`` steps are
dropped and the median of the rest is reported. accelerate's mixed-precision state is per process, so each dtype
is one worker process (fp32: TRL with ``bf16=False``; bf16: TRL's defaults as they are, ours with
``train.mixed_precision=bf16``), and the losses are compared within one dtype.

Reported per contestant: median s/step, tokens/s (non-pad tokens of the batch's chosen + rejected rows, the same
count for both libraries), loss at step 0 (and the largest |loss difference| to TRL over the first steps), MFU and
peak RSS. MFU = 6 * N * tokens / step time / ceiling, N = the parameters a token passes through as matmuls
(blocks + the tied LM head, not the position table): the model FLOPs of the task, equal for both libraries, so
MFU ratios are speed ratios; the DPO reference forward and gradient checkpointing's recompute are not counted.
The ceiling is the best torch.mm throughput of this dtype on shapes of this model (and 1024^3), measured in the
same worker before and after the steps. Peak memory is ``ru_maxrss`` of a separate process that runs only that
contestant for ``--memory-steps`` steps, with the process's RSS before building the contestant (imports, data)
shown as the baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
BATCH = 8
TRL_LR = {"dpo": 1e-6, "orpo": 1e-6, "reward": 1e-4}  # TRL's default learning rates; ours uses the same


# ----------------------------------------------------------------------------------------------------- assets
def build_assets(work: Path) -> dict[str, Path]:
    """The tiny GPT-2 (causal LM) and the same weights with a seeded one-label score head (reward model)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prefopt.tiny import init_model

    lm_dir, rm_dir = work / "model", work / "rm"
    if not (lm_dir / "config.json").is_file():
        init_model(lm_dir, [str(HH)], arch="gpt2", size="tiny", vocab_size=4096, seed=0)
    if not (rm_dir / "config.json").is_file():
        torch.manual_seed(0)
        rm = AutoModelForSequenceClassification.from_pretrained(lm_dir, num_labels=1)
        tokenizer = AutoTokenizer.from_pretrained(lm_dir)
        rm.config.pad_token_id = tokenizer.pad_token_id
        rm.save_pretrained(rm_dir, safe_serialization=True)
        tokenizer.save_pretrained(rm_dir)
    return {"lm": lm_dir, "rm": rm_dir}


def load_pairs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The HH pair records in benchmark order: a seeded shuffle, cut to the rows the run uses."""
    from prefopt.config import DataConfig
    from prefopt.data import load_rows

    rows = load_rows(DataConfig(path=str(HH), eval_fraction=0.0), "pairs").train
    random.Random(args.seed).shuffle(rows)
    return rows[:(args.warmup + args.steps) * BATCH]


def data_config(args: argparse.Namespace):
    from prefopt.config import DataConfig

    return DataConfig(path=str(HH), eval_fraction=0.0, max_length=args.max_length, max_prompt_length=256)


def as_ranks(record: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": record["prompt"], "responses": [record["chosen"], record["rejected"]], "scores": [1.0, 0.0]}


# ----------------------------------------------------------------------------------------------------- contestants
class Contestant:
    """One training loop in its own thread; ``begin``/``end`` bracket each step and pass the baton."""

    side = ""

    def __init__(self, name: str, algorithm: str, args: argparse.Namespace, shared: dict[str, Any], **options):
        self.name, self.algorithm, self.args, self.shared, self.options = name, algorithm, args, shared, options
        self.dtype = args.dtype
        self.steps = args.warmup + args.steps
        self.times: list[float] = []
        self.losses: list[float] = []
        self.tokens: list[int] = []  # non-pad tokens of each step's batch
        self.setup_s = 0.0
        self.error: str | None = None
        self.go, self.idle = threading.Event(), threading.Event()
        self._t0 = 0.0
        self._created = time.perf_counter()

    # baton
    def begin(self) -> None:
        if not self.times and not self.setup_s:
            self.setup_s = time.perf_counter() - self._created
        self.idle.set()
        self.go.wait()
        self.go.clear()
        self._t0 = time.perf_counter()

    def end(self) -> None:
        self.times.append(time.perf_counter() - self._t0)

    def thread_main(self) -> None:
        self._created = time.perf_counter()
        try:
            self.train()
        except BaseException:  # noqa: BLE001 - reported by the runner
            self.error = traceback.format_exc()
        finally:
            self.idle.set()

    def train(self) -> None:
        raise NotImplementedError


def fit_in_turns(contestant: Contestant, trainer: Any) -> None:
    """Run a prefopt ``Trainer.fit`` with each optimizer step bracketed by the contestant's baton."""
    import torch

    train_step = trainer._train_step

    def timed_step(*a, **k):
        contestant.begin()
        try:
            return train_step(*a, **k)
        finally:
            contestant.end()

    trainer._train_step = timed_step
    with torch.random.fork_rng(devices=[]):
        trainer.fit()


def train_in_turns(contestant: Contestant, trainer: Any) -> None:
    """Run a TRL ``trainer.train()`` with each optimizer step bracketed by the contestant's baton."""
    import torch
    from transformers import TrainerCallback

    class Baton(TrainerCallback):
        def on_step_begin(self, *a, **k):
            contestant.begin()

        def on_step_end(self, *a, **k):
            contestant.end()

    trainer.add_callback(Baton())
    with torch.random.fork_rng(devices=[]):
        trainer.train()


def run_in_turns(contestants: list[Contestant], check: Any = None) -> None:
    """Start every contestant's thread (set-up one at a time), then give each one step in turn until all are done."""
    for c in contestants:  # set up one at a time (model loading, TRL's dataset passes, reference precompute)
        c.thread = threading.Thread(target=c.thread_main, name=c.name, daemon=True)
        c.thread.start()
        c.idle.wait()
        if c.error:
            raise RuntimeError(f"{c.name} failed to start:\n{c.error}")
    if check is not None:
        check()
    for _ in range(max(c.steps for c in contestants)):
        for c in contestants:  # one step each, in turn
            if c.error or len(c.times) >= c.steps:
                continue
            c.idle.clear()
            c.go.set()
            c.idle.wait()
            if c.error:
                raise RuntimeError(f"{c.name} failed:\n{c.error}")
    for c in contestants:
        c.thread.join(timeout=600)


class Ours(Contestant):
    side = "prefopt"

    def train(self) -> None:
        from prefopt.config import build_run_config
        from prefopt.data import build_dataloader
        from prefopt.trainer import Trainer

        args = self.args
        config = build_run_config(self.recipe())
        trainer = Trainer(config)
        kind = "ranks" if self.algorithm == "reward" else "pairs"
        records = self.shared["pairs"] if kind == "pairs" else [as_ranks(r) for r in self.shared["pairs"]]
        bucketing = self.options.get("bucketing", False)  # other batches of the same rows, in shuffled order
        loader, _ = build_dataloader(records, kind, trainer.tokenizer, config.data, BATCH, shuffle=bucketing,
                                     seed=args.seed, length_bucketing=bucketing)
        trainer.loaders = {"train": loader}
        trainer.algorithm = variant_class(self.algorithm, self.options)(config.algorithm, config, trainer.tokenizer)

        step_fn = trainer.algorithm.step

        def recorded_step(batch):
            for out in step_fn(batch):
                self.losses.append(float(out.loss.detach()))
                self.tokens.append(out.num_tokens)
                yield out

        trainer.algorithm.step = recorded_step
        fit_in_turns(self, trainer)

    def recipe(self) -> dict[str, Any]:
        """The recipe this contestant trains with (as a YAML recipe would give it)."""
        args, assets = self.args, self.shared["assets"]
        algorithm: dict[str, Any] = {"name": self.algorithm, "prefix_sharing": self.options.get("sharing", True)}
        if self.algorithm == "dpo":
            algorithm.update(beta=0.1, precompute_reference=self.options.get("precompute", False))
        elif self.algorithm == "orpo":
            algorithm.update(beta=0.1, nll_on="full")  # TRL's ORPO also scores the chosen prompt tokens
        return {
            "algorithm": algorithm,
            "model": {"name_or_path": str(assets["rm" if self.algorithm == "reward" else "lm"])},
            "data": dataclasses.asdict(data_config(args)),
            "train": {"output_dir": str(args.work / "runs" / self.dtype / self.name), "max_steps": self.steps,
                      "batch_size": BATCH, "learning_rate": TRL_LR[self.algorithm], "lr_scheduler": "constant",
                      "warmup_steps": 0, "max_grad_norm": 1.0, "seed": args.seed,
                      "mixed_precision": "bf16" if self.dtype == "bf16" else "no", "progress": False,
                      "save_model": False, "log_every": 10, "overwrite": True},  # a rerun replaces the last
        }


def variant_class(algorithm: str, options: dict[str, Any]) -> type:
    """The algorithm class, or a subclass with one ablation switched on (ablations live in the benchmark)."""
    from prefopt.algorithms.dpo import DPO
    from prefopt.algorithms.orpo import ORPO
    from prefopt.algorithms.reward import RewardModelling

    base = {"dpo": DPO, "orpo": ORPO, "reward": RewardModelling}[algorithm]
    if not any(options.get(k) for k in ("no_packing", "two_forwards", "full_logits")):
        return base
    from prefopt.scoring import sum_scored
    from prefopt.scoring import TokenScorer
    from prefopt.prefix import pair_groups, rank_groups, share_prefixes
    from prefopt.types import PairBatch, PairLogps

    class Variant(base):
        def layout(self, batch):
            if not options.get("no_packing"):
                return super().layout(batch)
            if isinstance(batch, PairBatch):
                groups = pair_groups(batch.num_pairs)
            else:
                groups = rank_groups(batch.input_ids.shape[0], batch.pairs, batch.pair_group)
            return share_prefixes(batch.input_ids, batch.attention_mask, groups, pack=False)

        def build(self):
            super().build()
            if options.get("full_logits"):
                self.model = FullLogitsScorer(self.model.lm)
                if getattr(self, "reference", None) is not None:
                    self.reference = FullLogitsScorer(self.reference.lm)

        def pair_logps(self, batch, split):
            if not options.get("two_forwards"):
                return super().pair_logps(batch, split)
            chosen, chosen_len = halves_logps(self.model, batch, 0)
            rejected, rejected_len = halves_logps(self.model, batch, 1)
            cached = self.cache.lookup(split, batch)
            if cached is None:
                ref_chosen, _ = halves_logps(self.reference_forward, batch, 0)
                ref_rejected, _ = halves_logps(self.reference_forward, batch, 1)
            else:
                ref_chosen, ref_rejected = cached
            return PairLogps(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len)

    class FullLogitsScorer(TokenScorer):
        """The LM head on every position (as TRL does on CPU), then the scored positions picked."""

        def forward(self, input_ids, attention_mask, score_mask, temperature=1.0, with_entropy=False, layout=None):
            import torch

            from prefopt.scoring import decoder_hidden

            if layout is None:
                hidden = decoder_hidden(self.lm, input_ids, attention_mask)[:, :-1]
                rows, cols = torch.meshgrid(torch.arange(input_ids.shape[0]), torch.arange(input_ids.shape[1] - 1),
                                            indexing="ij")
            else:
                packed = decoder_hidden(self.lm, layout.input_ids, layout.mask_for(self.lm, self.lm.dtype),
                                        layout.position_ids)
                rows, cols = torch.meshgrid(torch.arange(input_ids.shape[0]), torch.arange(input_ids.shape[1] - 1),
                                            indexing="ij")
                hidden = layout.gather(packed, rows, cols)
            logp = torch.log_softmax(self.lm.get_output_embeddings()(hidden).float(), -1)
            picked = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1) * score_mask[:, 1:]
            return torch.cat([torch.zeros_like(picked[:, :1]), picked], 1), None

    def halves_logps(scorer, batch, half):
        """Summed log-probs of the chosen (half 0) or rejected (half 1) rows, in a forward of their own."""
        n = batch.num_pairs
        rows = slice(half * n, (half + 1) * n)
        width = int(batch.attention_mask[rows].sum(1).max())
        ids, mask, completion = (x[rows, :width] for x in (batch.input_ids, batch.attention_mask,
                                                           batch.completion_mask))
        per_token, _ = scorer(ids, mask, completion)
        return sum_scored(per_token, completion)

    Variant.__name__ = f"{base.__name__}Variant"
    return Variant


class TRL(Contestant):
    side = "TRL"

    def train(self) -> None:
        from datasets import Dataset

        args, assets, best = self.args, self.shared["assets"], self.options.get("best", False)
        common = dict(output_dir=str(args.work / "runs" / self.dtype / self.name), per_device_train_batch_size=BATCH,
                      max_steps=self.steps, learning_rate=TRL_LR[self.algorithm], lr_scheduler_type="constant",
                      warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=args.seed, report_to="none",
                      save_strategy="no", disable_tqdm=True, train_sampling_strategy="sequential", use_cpu=True,
                      dataloader_num_workers=0, remove_unused_columns=False)
        if best:
            common["gradient_checkpointing"] = False
        if self.dtype == "fp32":
            common["bf16"] = False  # bf16: TRL's default (bf16=True) is left as it is
        pairs, features = self.shared["pairs"], self.shared["features"]
        rows = [{**r, "index": i} for i, r in enumerate(pairs)]
        if self.algorithm == "dpo":
            from trl import DPOConfig, DPOTrainer
            from trl.trainer.dpo_trainer import DataCollatorForPreference

            inner = DataCollatorForPreference(pad_token_id=self.shared["pad_id"])
            trainer = DPOTrainer(
                model=str(assets["lm"]), train_dataset=Dataset.from_list(rows),
                processing_class=self.shared["tokenizer"], data_collator=SameTokens(features, inner),
                args=DPOConfig(**common, beta=0.1, max_length=None, precompute_ref_log_probs=best))
        elif self.algorithm == "orpo":
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            trainer = ORPOTrainer(model=str(assets["lm"]), train_dataset=Dataset.from_list(rows),
                                  processing_class=self.shared["tokenizer"],
                                  data_collator=SameTokens(features, orpo_tensors(self.shared["pad_id"])),
                                  args=ORPOConfig(**common, beta=0.1))
        else:
            from trl import RewardConfig, RewardTrainer

            ids = [{"chosen_ids": f["prompt_ids"] + f["chosen_ids"],
                    "rejected_ids": f["prompt_ids"] + f["rejected_ids"]} for f in features]
            trainer = RewardTrainer(model=str(assets["rm"]), train_dataset=Dataset.from_list(ids),
                                    processing_class=self.shared["tokenizer"],
                                    args=RewardConfig(**common, max_length=args.max_length))
        compute_loss = trainer.compute_loss

        def recorded_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            out = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            self.losses.append(float((out[0] if return_outputs else out).detach()))
            return out

        trainer.compute_loss = recorded_loss
        self.tokens = self.shared["tokens"][:self.steps]  # the same batches as prefopt's, in the same order
        self.trainer = trainer
        train_in_turns(self, trainer)


class SameTokens:
    """A TRL data collator that swaps each example for prefopt's tokenization of the same row (by ``index``)."""

    def __init__(self, features: list[dict[str, Any]], inner: Any):
        self.features, self.inner = features, inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        keep = ("ref_chosen_logps", "ref_rejected_logps")
        return self.inner([{**self.features[e["index"]], **{k: e[k] for k in keep if k in e}} for e in examples])


def orpo_tensors(pad_id: int):
    """prefopt's pair batch as the tensors ORPOTrainer's collator makes (labels -100 off the responses)."""
    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        from prefopt.data.collate import pair_batch

        batch = pair_batch(features, pad_id)
        n = batch.num_pairs
        labels = batch.input_ids.masked_fill(batch.completion_mask == 0, -100)
        return {"chosen_input_ids": batch.input_ids[:n], "chosen_attention_mask": batch.attention_mask[:n],
                "chosen_labels": labels[:n], "rejected_input_ids": batch.input_ids[n:],
                "rejected_attention_mask": batch.attention_mask[n:], "rejected_labels": labels[n:]}
    return collate


# ----------------------------------------------------------------------------------------------------- the run
def lineup(args: argparse.Namespace) -> list[tuple[str, str, type, dict[str, Any]]]:
    """(name, algorithm, class, options) of every contestant of this worker."""
    out = []
    for algo in args.algorithms:
        out.append((f"{algo}/prefopt", algo, Ours, {}))
        if algo == "dpo":
            out.append((f"{algo}/prefopt+precompute", algo, Ours, {"precompute": True}))
        out.append((f"{algo}/trl-default", algo, TRL, {}))
        out.append((f"{algo}/trl-best", algo, TRL, {"best": True}))
        if args.ablations and args.dtype == "fp32":
            out.append((f"{algo}/prefopt-no-prefix-sharing", algo, Ours, {"sharing": False}))
            out.append((f"{algo}/prefopt-no-packing", algo, Ours, {"no_packing": True}))
            out.append((f"{algo}/prefopt+length-bucketing", algo, Ours, {"bucketing": True}))
            if algo != "reward":
                out.append((f"{algo}/prefopt+full-logits", algo, Ours, {"full_logits": True}))
            if algo == "dpo":
                out.append((f"{algo}/prefopt-no-sharing+two-forwards", algo, Ours,
                            {"sharing": False, "two_forwards": True}))
    return [c for c in out if not args.only or c[0] in args.only]


def matmul_ceiling(dtype: str) -> float:
    """Best torch.mm GFLOP/s of ``dtype`` over this model's shapes and a square one."""
    import torch

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    best = 0.0
    for m, k, n in ((4096, 256, 1024), (4096, 1024, 256), (4096, 256, 4096), (1024, 1024, 1024)):
        a, b = torch.randn(m, k, dtype=torch_dtype), torch.randn(k, n, dtype=torch_dtype)
        for _ in range(2):
            a @ b
        times = []
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best = max(best, 2 * m * k * n / min(times) / 1e9)
    return best


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run this worker's contestants in turn, one step each, and return their measurements."""
    import torch
    import transformers
    import trl
    from transformers import AutoTokenizer

    from prefopt.data import build_dataloader
    from prefopt.data.collate import pair_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    assets = build_assets(args.work)
    tokenizer = AutoTokenizer.from_pretrained(assets["lm"])
    pairs = load_pairs(args)
    loader, _ = build_dataloader(pairs, "pairs", tokenizer, data_config(args), BATCH, shuffle=False, seed=args.seed,
                                 length_bucketing=False)
    features = list(loader.dataset)
    batches = [pair_batch(features[i:i + BATCH], tokenizer.pad_token_id) for i in range(0, len(features), BATCH)]
    shared = {"assets": assets, "tokenizer": tokenizer, "pad_id": tokenizer.pad_token_id, "pairs": pairs,
              "features": features, "tokens": [int(b.attention_mask.sum()) for b in batches]}
    baseline_rss = rss_mb()
    ceiling_before = matmul_ceiling(args.dtype) if not args.only else float("nan")

    contestants = [cls(name, algo, args, shared, **options) for name, algo, cls, options in lineup(args)]
    run_in_turns(contestants, check=lambda: check_same_batches(contestants, batches))
    ceiling_after = matmul_ceiling(args.dtype) if not args.only else float("nan")

    tokens = [int(b.attention_mask.sum()) for b in batches]
    return {
        "token_slots_per_step": token_slots(batches, pairs, tokenizer, args),
        "dtype": args.dtype, "threads": torch.get_num_threads(), "baseline_rss_mb": baseline_rss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "ceiling_gflops": {"before": ceiling_before, "after": ceiling_after},
        "tokens_per_step": tokens, "padded_tokens_per_step": [b.input_ids.numel() for b in batches],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "contestants": {c.name: {"algorithm": c.algorithm, "side": c.side, "options": c.options, "times": c.times,
                                 "losses": c.losses, "tokens": c.tokens, "setup_s": c.setup_s}
                        for c in contestants},
    }


def token_slots(batches: list[Any], pairs: list[dict[str, Any]], tokenizer: Any,
                args: argparse.Namespace) -> dict[str, float]:
    """Mean token positions one forward runs per step: padded rows, shared prefixes, shared and packed."""
    from prefopt.algorithms.pairwise import pair_layout
    from prefopt.data import build_dataloader

    bucketed, _ = build_dataloader(pairs, "pairs", tokenizer, data_config(args), BATCH, shuffle=True,
                                   seed=args.seed, length_bucketing=True)
    mean = statistics.mean
    return {"real tokens": mean(int(b.attention_mask.sum()) for b in batches),
            "padded rows (TRL, prefopt-no-prefix-sharing)": mean(b.input_ids.numel() for b in batches),
            "shared prefix, one pair per row": mean(pair_layout(b, pack=False).num_tokens for b in batches),
            "shared prefix, packed (prefopt)": mean(pair_layout(b).num_tokens for b in batches),
            "padded rows, length-bucketed batches": mean(b.input_ids.numel() for b in bucketed),
            "shared prefix, packed, length-bucketed batches": mean(pair_layout(b).num_tokens for b in bucketed)}


def check_same_batches(contestants: list[Contestant], batches: list[Any]) -> None:
    """TRL's first DPO / reward batches hold exactly prefopt's tensors (ORPO's collator is built from them)."""
    import torch

    for c in contestants:
        if not isinstance(c, TRL):
            continue
        for k, ours in enumerate(batches[:2]):
            got = c.trainer.data_collator([c.trainer.train_dataset[i] for i in range(k * BATCH, (k + 1) * BATCH)])
            if c.algorithm == "orpo":
                n = ours.num_pairs
                got = {"input_ids": torch.cat([got["chosen_input_ids"], got["rejected_input_ids"]]),
                       "attention_mask": torch.cat([got["chosen_attention_mask"], got["rejected_attention_mask"]]),
                       "completion_mask": torch.cat([got["chosen_labels"], got["rejected_labels"]]) != -100}
                assert n == BATCH
            assert torch.equal(got["input_ids"], ours.input_ids), c.name
            assert torch.equal(got["attention_mask"], ours.attention_mask), c.name
            if "completion_mask" in got:
                assert torch.equal(got["completion_mask"].long(), ours.completion_mask), c.name


# ----------------------------------------------------------------------------------------------------- report
def parameters_per_token(work: Path) -> int:
    """Matmul parameters a token passes through: all but the position table (the tied wte is the LM head)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(work / "model")
    return c.n_layer * 12 * c.n_embd**2 + c.vocab_size * c.n_embd


def summarise(result: dict[str, Any], warmup: int, n_params: int, memory: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    ceiling = max(result["ceiling_gflops"].values())
    trl_losses = {c["algorithm"]: c["losses"] for name, c in result["contestants"].items()
                  if name.endswith("/trl-default")}
    for name, c in result["contestants"].items():
        times, tokens = c["times"][warmup:], c["tokens"][warmup:]
        flops = [6 * n_params * n / t / 1e9 for n, t in zip(tokens, times)]
        reference = trl_losses.get(c["algorithm"], [])
        diffs = [abs(a - b) for a, b in zip(c["losses"], reference)]
        mem = memory.get(name, {})
        rows.append({
            "name": name, "dtype": result["dtype"], "s_per_step": statistics.median(times),
            "tokens_per_s": sum(tokens) / sum(times), "mfu": statistics.median(flops) / ceiling,
            "loss0": c["losses"][0] if c["losses"] else float("nan"),
            "loss0_diff": diffs[0] if diffs else float("nan"), "max_loss_diff": max(diffs) if diffs else float("nan"),
            "peak_rss_mb": mem.get("peak_rss_mb", float("nan")), "baseline_rss_mb": mem.get("baseline_rss_mb",
                                                                                           float("nan")),
            "setup_s": c["setup_s"], "steps_timed": len(times),
        })
    return rows


MAIN = ("prefopt", "prefopt+precompute", "trl-default", "trl-best")


def markdown(rows: list[dict[str, Any]], results: dict[str, Any], args: argparse.Namespace) -> str:
    first = results[next(iter(results))]
    lines = [f"# prefopt vs TRL {first['versions']['trl']} (torch {first['versions']['torch']}, transformers "
             f"{first['versions']['transformers']})", "", f"`python {' '.join(sys.argv)}`", "",
             f"{args.steps} timed steps per contestant after {args.warmup} warm-up, batch {BATCH} pairs, max length "
             f"{args.max_length}, torch threads {first['threads']}; the same batches for every contestant.", ""]
    for dtype, result in results.items():
        c = result["ceiling_gflops"]
        lines.append(f"- matmul ceiling {dtype}: {max(c.values()):.0f} GFLOP/s (before the steps {c['before']:.0f}, "
                     f"after {c['after']:.0f})")
    by_key = {(r["name"], r["dtype"]): r for r in rows}

    def ratio(r: dict[str, Any], other: str) -> str:
        o = by_key.get((f"{r['name'].split('/')[0]}/{other}", r["dtype"]))
        return f"{o['s_per_step'] / r['s_per_step']:.2f}x" if o else "-"

    lines += ["", "## prefopt vs TRL", "",
              "| algorithm | contestant | dtype | s/step | speed-up vs TRL default | vs TRL best | tokens/s | MFU "
              "| peak RSS MB (baseline) | loss at step 0 | \\|Δ loss\\| vs TRL default: step 0 (max, all steps) "
              "| setup s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        algo, who = r["name"].split("/")
        if who not in MAIN:
            continue
        lines.append(
            f"| {algo} | {who} | {r['dtype']} | {r['s_per_step']:.3f} | {ratio(r, 'trl-default')} | "
            f"{ratio(r, 'trl-best')} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | "
            f"{r['peak_rss_mb']:.0f} ({r['baseline_rss_mb']:.0f}) | {r['loss0']:.6f} | "
            f"{r['loss0_diff']:.1e} ({r['max_loss_diff']:.1e}) | {r['setup_s']:.1f} |")
    ablations = [r for r in rows if r["name"].split("/")[1] not in MAIN]
    if ablations:
        lines += ["", "## Ablations (fp32): prefopt with one thing changed, in the same alternating run", "",
                  "| algorithm | variant | s/step | prefopt s/step | time vs prefopt (>1: slower) | tokens/s |",
                  "|---|---|---|---|---|---|"]
        for r in ablations:
            algo, who = r["name"].split("/")
            base = by_key[(f"{algo}/prefopt", r["dtype"])]
            lines.append(f"| {algo} | {who} | {r['s_per_step']:.3f} | {base['s_per_step']:.3f} | "
                         f"{r['s_per_step'] / base['s_per_step']:.2f} | {r['tokens_per_s']:.0f} |")
        slots = results.get("fp32", first)["token_slots_per_step"]
        lines += ["", "Token positions one forward runs per step (mean over the timed batches):", ""]
        lines += [f"- {name}: {value:.0f}" for name, value in slots.items()]
    return "\n".join(lines) + "\n"


def run_subprocess(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    out = args.work / f"worker-{os.getpid()}-{time.time_ns()}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), *extra]
    subprocess.run(command, check=True, cwd=ROOT)
    result = json.loads(out.read_text())
    out.unlink()
    return result


def common_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--algorithms", ",".join(args.algorithms), "--warmup", str(args.warmup), "--seed", str(args.seed),
             "--max-length", str(args.max_length), "--work", str(args.work)]
    flags += ["--ablations" if args.ablations else "--no-ablations"]
    return flags + (["--threads", str(args.threads)] if args.threads else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", default="dpo,orpo,reward", type=lambda s: s.split(","))
    parser.add_argument("--dtypes", default="fp32,bf16", type=lambda s: s.split(","))
    parser.add_argument("--steps", type=int, default=12, help="timed steps per contestant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--memory-steps", type=int, default=4, help="steps of each peak-memory process (0: none)")
    parser.add_argument("--no-memory", dest="memory_steps", action="store_const", const=0)
    parser.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=ROOT / "bench_runs" / "vs_trl")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--only", default="", type=lambda s: [x for x in s.split(",") if x], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.worker:
        result = worker(args)
        args.worker.write_text(json.dumps(result))
        return

    build_assets(args.work)
    n_params = parameters_per_token(args.work)
    results, rows = {}, []
    for dtype in args.dtypes:
        flags = common_flags(args) + ["--dtype", dtype]
        results[dtype] = run_subprocess(args, flags + ["--steps", str(args.steps)])
        memory = {}
        if args.memory_steps:
            warm = max(args.memory_steps - args.warmup, 0)
            for name in results[dtype]["contestants"]:
                if "prefopt-" in name or "prefopt+length" in name or "+full" in name:
                    continue  # ablations: timing only
                one = run_subprocess(args, [*flags, "--steps", str(warm), "--only", name])
                memory[name] = {"peak_rss_mb": one["peak_rss_mb"], "baseline_rss_mb": one["baseline_rss_mb"]}
        rows += summarise(results[dtype], args.warmup, n_params, memory)
    table = markdown(rows, results, args)
    (args.work / "results.json").write_text(json.dumps({"results": results, "rows": rows}, indent=1))
    (args.work / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
