"""The conformance matrix: every registered algorithm x {gpt2-real, llama-chat} x {fp32, bf16 autocast} x
{full weights, LoRA} x {gradient_accumulation_steps 1, 2}, two steps each through the real Trainer.

An algorithm registered later joins by itself (``prefopt.registry.ALGORITHMS``) and must state what its first
step is worth in ``STEP_ONE`` below. At step 1 the policy is still the model it started from, so

* with a reference the log-ratio is 0 and the loss is its analytic value: DPO (sigmoid, Rafailov et al. eq. 7)
  log 2 with zero implicit rewards, KTO 0.5 with a KL estimate of 0, PPO and A2C a KL of 0 to the reference, and
  PPO's ratio 1 (approx KL 0, nothing clipped); every registered pairwise loss with a reference likewise (IPO
  1 / (4 beta^2), hinge 1, cdpo and robust log 2: ``DPO_LOSS_AT_ZERO``);
* without one the loss equals the same loss computed another way on the same batches: plain transformers
  forwards (its causal-LM loss for pt / sft, its sequence-classification scores in the Bradley-Terry loss for the
  reward model, its logits in the paper's formula for ORPO).

Every cell scores with the LM head in small chunks (``CHUNKED_LOGITS``, prefopt.lm_head). Tolerances: 1e-6 on
analytic values in fp32; 1e-5 on analytic values under bf16 autocast (policy and reference
must run the same forward under the same autocast, so only the rounding of sums may differ; a reference run outside
the autocast is off by 1e-4..1e-3); 1e-5 on values computed another way in both precisions (the plain forward runs
under ``torch.autocast`` in a bf16 cell: measured within 1.2e-7 relative, while bf16 moves these losses by up to
3e-4 from fp32). Step 2 must have moved the policy. A combination an algorithm cannot run is refused
when the recipe is read (``Algorithm.check_run``: a ConfigError, ``prefopt train`` exits 2 with one line);
``REFUSED`` lists each with its message.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from prefopt.cli import main
from prefopt.config import build_run_config
from prefopt.errors import ConfigError
from prefopt.registry import ALGORITHMS, LOSSES
from prefopt.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = ("gpt2-real", "llama-chat")
PRECISIONS = ("fp32", "bf16")
WEIGHTS = ("full", "lora")
ACCUMULATION = (1, 2)
ANALYTIC_TOLERANCE = {"fp32": 1e-6, "bf16": 1e-5}
ONLINE_REWARD = [{"name": "length_penalty", "params": {"target": 2}}]
SETTINGS: dict[str, dict[str, Any]] = {  # algorithm settings of a cell (beyond the defaults)
    "ppo": {"rewards": ONLINE_REWARD, "generation": {"max_new_tokens": 4}, "epochs": 1, "num_minibatches": 1},
    "a2c": {"trainable_layers": 1, "preference_weight": 0.0, "rules": {}, "rewards": ONLINE_REWARD,
            "generation": {"max_new_tokens": 4}},
    # the 4-token samples all get the same reward, so the group advantages are 0: an entropy bonus moves the policy
    **{name: {"rewards": ONLINE_REWARD, "generation": {"max_new_tokens": 4}, "num_samples": 2, "kl_coef": 0.05,
              "num_minibatches": 1, "entropy_coef": 0.01} for name in ("grpo", "rloo", "reinforce_pp")},
}
REFUSED = {  # (algorithm, axis value) -> the one line a user sees
    ("a2c", "lora"): "model.lora.r=4: a2c trains the top blocks in full on a frozen shared trunk (no LoRA or 4-bit); "
                     "set model.lora.r=0",
}
SETTING_REFUSED = {  # (algorithm, section, key, value) -> the one line a user sees, for settings outside the axes
    ("kto", "train", "batch_size", 1):
        "train.batch_size=1: KTO needs >= 2 rows per batch to estimate its KL reference point",
    **{(online, "model", "disable_dropout", False):
       f"model.disable_dropout=False: {online} compares the policy with its old self and its reference token by "
       "token; dropout must be off" for online in ("ppo", "a2c", "grpo", "rloo", "reinforce_pp")},
}
# the LM head in chunks of 5 positions x 100 vocabulary entries, none kept: each recomputed in the backward
# (prefopt.lm_head): every cell's values come through the chunked path at its smallest
CHUNKED_LOGITS = {"chunk": 5, "vocab_block": 100, "keep_mb": 0.005}
CELLS = list(itertools.product(ALGORITHMS.available(), MODELS, PRECISIONS, WEIGHTS, ACCUMULATION))
DPO_BETA = 0.1
DPO_LOSS_AT_ZERO = {  # each registered pairwise loss with a reference at log-ratio 0, default parameters
    "sigmoid": math.log(2), "cdpo": math.log(2), "robust": math.log(2),  # -log sigmoid(0), smoothed or debiased
    "hinge": 1.0,  # relu(1 - 0)
    "ipo": 1 / (4 * DPO_BETA**2),  # (0 - 1 / (2 beta))^2
}
WITH_REFERENCE = [name for name, fn in LOSSES.items() if not getattr(fn, "reference_free", False)]


def refusal(algorithm: str, *axes: Any) -> str | None:
    return next((REFUSED[(algorithm, axis)] for axis in axes if (algorithm, axis) in REFUSED), None)


@pytest.fixture(scope="module")
def pairs_path(hh_head) -> Path:
    """16 HH pairs, shared by every cell (pairs also give text, sft, ranks, unpaired and prompt rows)."""
    return hh_head(16)


@pytest.fixture(scope="module")
def reward_model_dirs(realistic_model_dirs, tmp_path_factory) -> dict[str, Path]:
    """Each fixture as a sequence-classification model with a saved score head, so both sides read the same head."""
    out = {}
    for name in MODELS:
        torch.manual_seed(0)
        source = realistic_model_dirs[name]
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1)
        tokenizer = AutoTokenizer.from_pretrained(source)
        model.config.pad_token_id = tokenizer.pad_token_id
        out[name] = tmp_path_factory.mktemp(f"rm-{name}")
        model.save_pretrained(out[name])
        tokenizer.save_pretrained(out[name])
    return out


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each cell picks its own mixed precision; accelerate keeps one per process unless its state is reset."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def recipe(algorithm: str, model_dir: Path, data: Path, precision: str, weights: str, accumulation: int,
           out: Path) -> dict[str, Any]:
    return {
        "algorithm": {"name": algorithm, **SETTINGS.get(algorithm, {})},
        "model": {"name_or_path": str(model_dir), "logits": CHUNKED_LOGITS,
                  **({"lora": {"r": 4, "alpha": 8}} if weights == "lora" else {})},
        "data": {"path": str(data), "eval_fraction": 0.0, "max_length": 64, "max_prompt_length": 32},
        "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 2, "gradient_accumulation_steps": accumulation,
                  "learning_rate": 1e-3, "log_every": 1, "progress": False, "save_model": False,
                  "mixed_precision": "bf16" if precision == "bf16" else "no"},
    }


# ------------------------------------------------------------------------------------------ step-one values


@dataclass
class Cell:
    trainer: Trainer
    rows: list[dict[str, float]]  # the two logged train rows
    model_dir: Path
    precision: str

    @property
    def tolerance(self) -> float:
        return ANALYTIC_TOLERANCE[self.precision]

    def first_batches(self) -> list[Any]:
        """The batches step 1 consumed (the batch order is a function of the seed and the epoch)."""
        batches = self.trainer._batches(0, 0)
        return [next(batches) for _ in range(self.trainer.config.train.gradient_accumulation_steps)]

    def plain_forward(self):
        """A plain transformers forward in this cell's precision."""
        if self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def assert_computed_another_way(self, per_batch: Callable[[Any], torch.Tensor]) -> None:
        """Step 1's logged loss is the mean of its micro-batches' losses, each computed by ``per_batch``."""
        with torch.no_grad(), self.plain_forward():
            expected = float(torch.stack([per_batch(batch).float() for batch in self.first_batches()]).mean())
        assert self.rows[0]["train/loss"] == pytest.approx(expected, abs=1e-5)


def plain_lm(cell: Cell) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(cell.model_dir, dtype=torch.float32).eval()


def lm_step_one(cell: Cell) -> None:
    """pt / sft: transformers' causal-LM loss (token mean over labelled tokens) on the same batches."""
    model = plain_lm(cell)
    cell.assert_computed_another_way(
        lambda b: model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss)


def reward_step_one(cell: Cell) -> None:
    """Bradley-Terry, -log sigmoid(r_w - r_l) averaged per prompt then over prompts, on plain transformers scores."""
    model = AutoModelForSequenceClassification.from_pretrained(cell.model_dir, dtype=torch.float32).eval()

    def loss(batch):
        scores = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0].float()
        per_pair = -F.logsigmoid(scores[batch.pairs[:, 0]] - scores[batch.pairs[:, 1]])
        return torch.stack([per_pair[batch.pair_group == g].mean() for g in batch.pair_group.unique()]).mean()

    cell.assert_computed_another_way(loss)


def orpo_step_one(cell: Cell) -> None:
    """Hong et al. eq. 6-7 from plain transformers logits: chosen-response NLL - beta * log sigmoid(log odds ratio)."""
    model, beta = plain_lm(cell), cell.trainer.config.algorithm.beta

    def loss(batch):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
        token_logps = logits.log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        response = batch.completion_mask[:, 1:].float()
        mean_logps = (token_logps * response).sum(-1) / response.sum(-1)
        chosen, rejected = mean_logps.chunk(2)
        n = batch.num_pairs
        nll = -(token_logps[:n] * response[:n]).sum() / response[:n].sum()
        log_odds = (chosen - rejected) - (torch.log1p(-chosen.exp()) - torch.log1p(-rejected.exp()))
        return nll - beta * F.logsigmoid(log_odds).mean()

    cell.assert_computed_another_way(loss)


def dpo_step_one(cell: Cell) -> None:
    first, second = cell.rows
    assert first["train/loss"] == pytest.approx(math.log(2), abs=cell.tolerance)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin"):  # beta * log-ratio
        assert first[key] == pytest.approx(0.0, abs=cell.tolerance), key
    assert abs(second["rewards/chosen"]) + abs(second["rewards/rejected"]) > 0  # step 1 moved the policy


def kto_step_one(cell: Cell) -> None:
    first, second = cell.rows
    assert first["kto/kl"] == pytest.approx(0.0, abs=cell.tolerance)
    assert first["train/loss"] == pytest.approx(0.5, abs=cell.tolerance)
    assert second["train/loss"] != first["train/loss"]


def ppo_step_one(cell: Cell) -> None:
    first, second = cell.rows
    assert first["kl"] == pytest.approx(0.0, abs=cell.tolerance)  # policy == reference
    assert first["approx_kl"] == pytest.approx(0.0, abs=cell.tolerance)  # ratio 1 on the first minibatch
    assert first["clip_fraction"] == 0.0
    assert second["kl"] != 0.0


def a2c_step_one(cell: Cell) -> None:
    first, second = cell.rows
    assert first["kl"] == pytest.approx(0.0, abs=cell.tolerance)
    assert second["kl"] != 0.0


def group_step_one(cell: Cell) -> None:
    """grpo / rloo / reinforce_pp: at step 1 the policy is its reference (KL 0) and the ratio is 1 (nothing clipped)."""
    first, second = cell.rows
    assert first["kl"] == pytest.approx(0.0, abs=cell.tolerance)
    assert first["clip_fraction"] == 0.0
    assert second["kl"] != 0.0


STEP_ONE: dict[str, Callable[[Cell], None]] = {
    "pt": lm_step_one, "sft": lm_step_one, "reward": reward_step_one, "orpo": orpo_step_one,
    "dpo": dpo_step_one, "kto": kto_step_one, "ppo": ppo_step_one, "a2c": a2c_step_one,
    "grpo": group_step_one, "rloo": group_step_one, "reinforce_pp": group_step_one,
}


# ------------------------------------------------------------------------------------------ the matrix


@pytest.mark.parametrize("algorithm,model,precision,weights,accumulation", CELLS,
                         ids=["-".join(map(str, cell)) for cell in CELLS])
def test_cell(algorithm, model, precision, weights, accumulation, realistic_model_dirs, reward_model_dirs,
              pairs_path, tmp_path):
    model_dir = (reward_model_dirs if ALGORITHMS.get(algorithm).kind == "ranks" else realistic_model_dirs)[model]
    cell_recipe = recipe(algorithm, model_dir, pairs_path, precision, weights, accumulation, tmp_path)
    refused = refusal(algorithm, model, precision, weights, accumulation)
    if refused is not None:
        with pytest.raises(ConfigError) as error:
            build_run_config(cell_recipe)
        assert str(error.value) == refused
        return
    assert algorithm in STEP_ONE, f"state what step 1 of {algorithm!r} is worth in STEP_ONE ({__file__})"
    trainer = Trainer(build_run_config(cell_recipe))
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "train/loss" in row]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(row["train/loss"]) and row["train/skipped_updates"] == 0
        assert row["train/grad_norm"] > 0
    STEP_ONE[algorithm](Cell(trainer, rows, model_dir, precision))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("loss", WITH_REFERENCE)
def test_every_pairwise_loss_starts_at_its_analytic_value(loss, precision, gpt2_real_dir, pairs_path, tmp_path):
    """DPO with each registered loss that has a reference (reference-free ones, e.g. simpo, are compared with TRL in
    tests/test_losses_plugins.py), one step on gpt2-real: the first loss is the loss of a zero log-ratio."""
    assert loss in DPO_LOSS_AT_ZERO, f"state the value of loss {loss!r} at log-ratio 0 in DPO_LOSS_AT_ZERO"
    data = recipe("dpo", gpt2_real_dir, pairs_path, precision, "full", 1, tmp_path)
    data["algorithm"].update({"loss": loss, "beta": DPO_BETA})
    data["train"]["max_steps"] = 1
    Trainer(build_run_config(data)).fit()
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train/loss"] == pytest.approx(DPO_LOSS_AT_ZERO[loss], abs=ANALYTIC_TOLERANCE[precision])


@pytest.mark.parametrize("refused", sorted(REFUSED), ids=["-".join(map(str, key)) for key in sorted(REFUSED)])
def test_a_refused_combination_is_one_line_and_exit_2_at_the_cli(refused, llama_chat_dir, pairs_path, tmp_path, capsys):
    algorithm, axis = refused
    weights = axis if axis in WEIGHTS else "full"
    precision = axis if axis in PRECISIONS else "fp32"
    accumulation = axis if axis in ACCUMULATION else 1
    path = tmp_path / "recipe.yaml"  # JSON is YAML
    path.write_text(json.dumps(recipe(algorithm, llama_chat_dir, pairs_path, precision, weights, accumulation,
                                      tmp_path / "run")))
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"prefopt: error: {REFUSED[refused]}"]
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.parametrize("setting", sorted(SETTING_REFUSED, key=str), ids=lambda key: "-".join(map(str, key)))
def test_settings_an_algorithm_cannot_run_are_refused_when_the_recipe_is_read(setting, llama_chat_dir, pairs_path,
                                                                              tmp_path):
    """Beyond the matrix's axes: KTO's KL reference point needs two rows per batch (a one-row batch's mismatched pair
    is itself); the online algorithms compare the policy with its old self and its reference token by token."""
    algorithm, section, key, value = setting
    data = recipe(algorithm, llama_chat_dir, pairs_path, "fp32", "full", 1, tmp_path)
    data[section][key] = value
    with pytest.raises(ConfigError) as error:
        build_run_config(data)
    assert str(error.value) == SETTING_REFUSED[setting]
