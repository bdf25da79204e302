"""A reward model trained by prefopt gives the same score in prefopt and in plain transformers, for the same text.

The convention is transformers' (``AutoModelForSequenceClassification`` reads the rightmost token that is not
``config.pad_token_id``): with pad = eos (``gpt2-real``) a text ending with eos is read at the token before the eos,
in prefopt too (``prefopt.scoring.score_positions``). On ``llama-chat`` (pad != eos) the eos is read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from prefopt.config import ModelConfig, build_run_config
from prefopt.data.collate import pad
from prefopt.errors import PrefoptError
from prefopt.models import load_reward_model, load_tokenizer
from prefopt.scoring import RewardScorer
from prefopt.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["\n\nHuman: how do I bake bread?\n\nAssistant: Mix flour, water and yeast.",
         "\n\nHuman: hi\n\nAssistant: Hello! How can I help?",
         "\n\nHuman: what is two plus two?\n\nAssistant: Four."]


@pytest.fixture(scope="module", params=["gpt2-real", "llama-chat"])
def trained(request, realistic_model_dirs, hh_path, tmp_path_factory):
    """(fixture name, a reward model trained two steps by the reward stage, the Trainer that trained it)."""
    out = tmp_path_factory.mktemp(f"rm-{request.param}")
    config = build_run_config({
        "algorithm": {"name": "reward"},
        "model": {"name_or_path": str(realistic_model_dirs[request.param])},
        "data": {"path": str(hh_path), "eval_fraction": 0.0, "max_examples": 8, "max_length": 160,
                 "max_prompt_length": 64},
        "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "progress": False,
                  "mixed_precision": "no"},
    })
    trainer = Trainer(config)
    trainer.fit()
    return request.param, out / "model", trainer


def plain_scores(model_dir: Path, rows: list[list[int]]) -> torch.Tensor:
    """Each row alone (no padding) through plain transformers, as a user of the saved model scores it."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([row])).logits[0, 0] for row in rows])


def prefopt_scores(model_dir: Path, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """All rows in one right-padded batch through prefopt's loader and scorer."""
    scorer = RewardScorer(load_reward_model(str(model_dir), ModelConfig(name_or_path=str(model_dir))))
    ids = pad(rows, pad_id)
    mask = pad([[1] * len(row) for row in rows], 0)
    with torch.no_grad():
        return scorer(ids, mask)


def test_saved_reward_model_scores_the_same_in_plain_transformers(trained):
    name, model_dir, _ = trained
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert (tokenizer.pad_token_id == tokenizer.eos_token_id) == (name == "gpt2-real")
    text_rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    eos_rows = [row + [tokenizer.eos_token_id] for row in text_rows]  # as the reward stage tokenizes completions
    rows = text_rows + eos_rows
    plain = plain_scores(model_dir, rows)
    ours = prefopt_scores(model_dir, rows, tokenizer.pad_token_id)
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=0)
    assert plain.std() > 1e-3  # the texts get different scores: the comparison is not between constants
    if name == "gpt2-real":  # pad = eos: a trailing eos is not read, by either side
        torch.testing.assert_close(plain[len(TEXTS):], plain[:len(TEXTS)], atol=1e-6, rtol=0)
    else:  # the eos is read
        assert (plain[len(TEXTS):] - plain[:len(TEXTS)]).abs().min() > 1e-4


def test_training_batches_are_scored_as_plain_transformers_scores_their_rows(trained):
    """The reward stage's own forward (prefix sharing, eos-terminated completions) equals the saved model's."""
    _, model_dir, trainer = trained
    batch = next(iter(trainer.loaders["train"]))
    algorithm = trainer.algorithm
    assert algorithm.layout(batch) is not None  # the prefix-shared path is the one under test
    with torch.no_grad():
        ours = algorithm.scores(batch)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch.input_ids, batch.attention_mask)]
    ended = sum(row[-1] == trainer.tokenizer.eos_token_id for row in rows)
    assert ended >= 2  # completions end with eos (the rest were cut at data.max_length)
    torch.testing.assert_close(ours, plain_scores(model_dir, rows), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ online reading
CHAT_ROWS = [
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I bake bread?"}],
     "chosen": "Mix flour, water and yeast, then bake.", "rejected": "No idea."},
    {"prompt": [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Name a prime."}], "chosen": "Seven.", "rejected": "Eight, I think."},
    {"prompt": [{"role": "user", "content": "What is two plus two?"}], "chosen": "Four.", "rejected": "Five."},
]


@pytest.fixture(scope="module")
def chat_reward_models(realistic_model_dirs, tmp_path_factory) -> dict[str, Path]:
    """A score head (seeded) on the ChatML (Qwen2) and the Llama-3 fixtures, saved as the reward stage saves one."""
    out = {}
    for name in ("qwen2-window", "llama-chat"):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(realistic_model_dirs[name], num_labels=1,
                                                                   dtype=torch.float32)
        model.config.pad_token_id = AutoTokenizer.from_pretrained(realistic_model_dirs[name]).pad_token_id
        out[name] = tmp_path_factory.mktemp(f"rm-{name}")
        model.save_pretrained(out[name])
        AutoTokenizer.from_pretrained(realistic_model_dirs[name]).save_pretrained(out[name])
    return out


def reward_stage_scores(rm_dir: Path, tmp_path: Path, **limits) -> torch.Tensor:
    """Scores of prompt + chosen and prompt + rejected of ``CHAT_ROWS``, as the reward stage reads them: the rows
    through the ``ranks`` kind with the RM's tokenizer, the batch through the RM's scorer."""
    from prefopt.config import DataConfig
    from prefopt.data import build_dataloader
    from prefopt.data.kinds import RANKS

    rows = [{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in CHAT_ROWS]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    records = [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]], "scores": [1.0, 0.0]} for r in rows]
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(rm_dir)))
    loader, _ = build_dataloader(records, "ranks", tokenizer, DataConfig(path=str(path), **limits),
                                 batch_size=len(records), shuffle=False, seed=0)
    batch = next(iter(loader))
    assert RANKS is not None and batch.input_ids.shape[0] == 2 * len(CHAT_ROWS)
    scorer = RewardScorer(load_reward_model(str(rm_dir), ModelConfig(name_or_path=str(rm_dir))))
    with torch.no_grad():
        return scorer(batch.input_ids, batch.attention_mask)  # [prompt 0 chosen, prompt 0 rejected, prompt 1 ...]


def chat_rollout(policy_tokenizer) -> "Rollout":
    """The chosen and rejected responses of ``CHAT_ROWS`` as a finished rollout: the prompts as the data gave them and
    as the policy's template renders them (token tensors are placeholders: the RM reads the texts)."""
    from prefopt.types import Rollout

    prompts = [row["prompt"] for row in CHAT_ROWS for _ in range(2)]
    responses = [row[key] for row in CHAT_ROWS for key in ("chosen", "rejected")]
    n = len(responses)
    return Rollout(prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.long),
                   response_ids=torch.zeros(n, 1, dtype=torch.long), response_mask=torch.ones(n, 1, dtype=torch.long),
                   logprobs=torch.zeros(n, 1), ended=torch.ones(n, dtype=torch.bool), responses=responses,
                   raw_prompts=prompts, prompts=[policy_tokenizer.apply_chat_template(p, tokenize=False,
                                                                                     add_generation_prompt=True)
                                                 for p in prompts])


@pytest.mark.parametrize("policy, rm", [("qwen2-window", "qwen2-window"), ("llama-chat", "llama-chat"),
                                        ("qwen2-window", "llama-chat"), ("llama-chat", "qwen2-window")])
def test_online_reward_model_scores_what_the_reward_stage_scored(policy, rm, realistic_model_dirs,
                                                                 chat_reward_models, tmp_path):
    """GRPO/RLOO/PPO read an RM where the reward stage trained it: the same (prompt, response) texts get the same
    score online (the policy's templated prompt, its decoded response) as in the reward stage, for ChatML and
    Llama-3 templates, for an RM of the policy's family and of the other one (rendered with ITS template)."""
    from prefopt.rl.rewards import RewardModelReward

    policy_tokenizer = load_tokenizer(ModelConfig(name_or_path=str(realistic_model_dirs[policy])))
    rollout = chat_rollout(policy_tokenizer)
    online = RewardModelReward(policy_tokenizer, "cpu", path=str(chat_reward_models[rm]))(rollout)
    expected = reward_stage_scores(chat_reward_models[rm], tmp_path)
    torch.testing.assert_close(online, expected, atol=1e-5, rtol=0)
    assert expected.std() > 1e-3  # different texts, different scores: the comparison is not between constants


def test_online_reward_model_cuts_rows_as_its_reward_stage_did(realistic_model_dirs, chat_reward_models, tmp_path):
    """The reward stage's data.max_length / max_prompt_length, read from the recipe saved with the RM, cut the online
    rows as they cut the training rows (here short enough to cut every prompt and response)."""
    from prefopt.rl.rewards import RewardModelReward

    rm = tmp_path / "rm"
    shutil.copytree(chat_reward_models["llama-chat"], rm)
    (rm / "prefopt_recipe.yaml").write_text("data: {max_length: 20, max_prompt_length: 12, chat_template: auto}\n")
    rollout = chat_rollout(load_tokenizer(ModelConfig(name_or_path=str(realistic_model_dirs["qwen2-window"]))))
    reader = RewardModelReward(None, "cpu", path=str(rm))
    assert (reader.data.max_length, reader.data.max_prompt_length) == (20, 12)
    expected = reward_stage_scores(rm, tmp_path, max_length=20, max_prompt_length=12)
    torch.testing.assert_close(reader(rollout), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, reward_stage_scores(rm, tmp_path))  # uncut rows score otherwise


def test_an_rm_trained_with_a_template_file_is_read_from_any_directory(realistic_model_dirs, chat_reward_models,
                                                                       tmp_path, monkeypatch):
    """A reward stage run with ``data.chat_template: <a file>`` saved that template with the RM (its tokenizer), and
    its recipe names the file relative to where it ran: the online reader renders with the RM's saved template, from
    any working directory, as it was trained."""
    from prefopt.rl.rewards import RewardModelReward

    rm = tmp_path / "rm"
    shutil.copytree(chat_reward_models["qwen2-window"], rm)
    (rm / "prefopt_recipe.yaml").write_text("data: {chat_template: templates/chat.jinja}\n")  # not there from here
    monkeypatch.chdir(tmp_path)
    rollout = chat_rollout(load_tokenizer(ModelConfig(name_or_path=str(realistic_model_dirs["llama-chat"]))))
    reader = RewardModelReward(None, "cpu", path=str(rm))
    torch.testing.assert_close(reader(rollout), reward_stage_scores(rm, tmp_path), atol=1e-5, rtol=0)


def test_a_causal_lm_given_as_reward_model_is_refused_and_a_new_head_is_said_once(realistic_model_dirs, trained,
                                                                                 capfd):
    """A frozen reward model whose checkpoint has no score head (an SFT model given by mistake) would score with a
    random projection: refused, naming the path and the missing weights. The reward stage (trainable) starting
    from the same causal LM is expected to lack it: no transformers LOAD REPORT table on stderr."""
    policy, rm = str(realistic_model_dirs["qwen2-window"]), trained[1]
    with pytest.raises(PrefoptError, match=r"has no trained score head \(score\.weight missing"):
        load_reward_model(policy, ModelConfig(name_or_path=policy))
    capfd.readouterr()
    model = load_reward_model(policy, ModelConfig(name_or_path=policy), trainable=True)
    said = "".join(capfd.readouterr())
    assert model.training and "LOAD REPORT" not in said and "not sharded" not in said, said
    for trainable in (False, True):  # a trained RM loads without a word from transformers either way
        load_reward_model(str(rm), ModelConfig(name_or_path=str(rm)), trainable=trainable)
        said = "".join(capfd.readouterr())
        assert "[transformers]" not in said and "not sharded" not in said, said


def card_loads(model_dir: Path):
    """What the ``## Use`` block of the model's card loads, run as a user would paste it."""
    card = (model_dir / "README.md").read_text()
    code = card.split("## Use", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scope = {"path": str(model_dir)}
    exec(code, scope)
    return scope["model"]


def test_a_reward_models_card_loads_it_with_its_score_head(trained, hh_path, tmp_path):
    """The card of a reward model said ``AutoModelForCausalLM`` (a random LM head, the score head dropped) and of a
    LoRA reward model ``AutoPeftModelForCausalLM``: it names the sequence-classification classes, and what it loads
    scores as prefopt does."""
    name, model_dir, _ = trained
    model = card_loads(model_dir)
    assert type(model).__name__.endswith("ForSequenceClassification")
    ids = [[5, 6, 7, 8, 9]]
    with torch.no_grad():
        loaded = model.eval()(input_ids=torch.tensor(ids)).logits[0, 0]
    torch.testing.assert_close(loaded, plain_scores(model_dir, ids)[0])
    config = build_run_config({
        "algorithm": {"name": "reward"}, "model": {"name_or_path": trained[2].config.model.name_or_path,
                                                   "lora": {"r": 4}},
        "data": {"path": str(hh_path), "eval_fraction": 0.0, "max_examples": 4, "max_length": 96,
                 "max_prompt_length": 48},
        "train": {"output_dir": str(tmp_path / "rm-lora"), "max_steps": 1, "batch_size": 4, "progress": False}})
    Trainer(config).fit()
    adapter = card_loads(tmp_path / "rm-lora" / "model")
    assert type(adapter).__name__ == "PeftModelForSequenceClassification"
    ours = load_reward_model(str(tmp_path / "rm-lora" / "model"), ModelConfig(dtype="auto"))  # as the card loads it
    with torch.no_grad():
        torch.testing.assert_close(adapter.eval()(input_ids=torch.tensor(ids)).logits,
                                   ours(input_ids=torch.tensor(ids)).logits)
