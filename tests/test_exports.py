"""A chat run from a user's folder to a model used elsewhere: chat rows need a template (a named one is saved with the
model), epochs, the start banner and "resuming from step N", a LoRA adapter that names its base by an absolute path,
a model card and recipe in every model/, checkpoint weights stored once, the hub upload (a local stand-in),
``merge-adapter`` from another directory, a mistyped local model path failing at once; ``init-model --chat-template``;
every optimizer choice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.cli import main
from prefopt.chat_templates import CHATML, TEMPLATES

pytestmark = pytest.mark.usefixtures("one_thread")


def conversations(n: int) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."},
                          {"role": "user", "content": "And times two?"},
                          {"role": "assistant", "content": f"That is {4 * i}."}]} for i in range(n)]


class HubStandIn:
    """``huggingface_hub.HfApi`` as ``push_to_hub`` uses it, writing into a local folder instead of the network."""

    root: Path
    repos: dict[str, bool] = {}

    def create_repo(self, repo_id: str, private: bool = False, exist_ok: bool = False) -> str:
        HubStandIn.repos[repo_id] = private
        return repo_id

    def upload_folder(self, repo_id: str, folder_path: str, commit_message: str) -> str:
        shutil.copytree(folder_path, HubStandIn.root / repo_id, dirs_exist_ok=True)
        return f"local://{repo_id} ({commit_message})"


def train(capsys, recipe: Path, *overrides: str) -> tuple[int, str]:
    code = main(["train", str(recipe), *overrides])
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_a_chat_run_from_a_user_folder_to_a_model_used_elsewhere(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    user = tmp_path / "user"
    shutil.copytree(tiny_model_dir, user / "models" / "base")  # a GPT-2 tokenizer without a chat template
    (user / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in conversations(24)))
    recipe = user / "sft.yaml"
    recipe.write_text(yaml.safe_dump({
        "algorithm": "sft", "model": {"name_or_path": "models/base", "lora": {"r": 4}},
        "data": {"path": "data.jsonl", "eval_fraction": 0.0, "max_length": 96, "max_prompt_length": 64},
        "train": {"output_dir": "runs/sft", "epochs": 2, "batch_size": 4, "save_every": 4, "progress": False,
                  "optimizer": "adafactor", "learning_rate": 1.0e-3, "push_to_hub": "me/chat-sft"}}))
    monkeypatch.chdir(user)
    HubStandIn.root = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub, "HfApi", HubStandIn)

    code, err = train(capsys, recipe, "train.output_dir=runs/no-template")  # chat rows, no template: refused
    assert code == 2 and "has no chat template: set data.chat_template to chatml or llama3" in err
    code, err = train(capsys, recipe, "model.name_or_path=models/bse")  # a typo: no hub lookup
    assert code == 2 and "'models/bse': the folder does not exist; did you mean 'models/base'?" in err

    code, err = train(capsys, recipe, "data.chat_template=chatml")
    assert code == 0, err
    assert "trainable (" in err and "6 steps per epoch; 12 steps (2.00 epochs)" in err  # 24 rows / 4 per step
    model = user / "runs" / "sft" / "model"
    adapter = json.loads((model / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(user / "models" / "base")  # absolute, not "models/base"
    assert AutoTokenizer.from_pretrained(model).chat_template == CHATML  # the named template went with the model
    checkpoint = user / "runs" / "sft" / "checkpoints" / "step-00000012"
    names = {p.name for p in checkpoint.iterdir()}
    assert "model.safetensors" not in names and (checkpoint / "model" / "adapter_model.safetensors").is_file()
    for folder in (model, checkpoint / "model"):
        card = (folder / "README.md").read_text()
        assert "library_name: peft" in card and f"`{user / 'models' / 'base'}`" in card and "prefopt 0.1.0" in card
        assert "data fingerprint" in card and "`train.optimizer`: `adafactor`" in card
        recorded = yaml.safe_load((folder / "prefopt_recipe.yaml").read_text())
        assert recorded["data"]["chat_template"] == "chatml" and recorded["train"]["epochs"] == 2
    assert "| train/loss |" in (model / "README.md").read_text()
    assert HubStandIn.repos == {"me/chat-sft": True}
    assert (tmp_path / "hub" / "me" / "chat-sft" / "adapter_model.safetensors").is_file()

    code, err = train(capsys, recipe, "data.chat_template=chatml", "train.resume=auto", "train.epochs=3")
    assert code == 0 and "resuming from step 12 of 18" in err, err

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["merge-adapter", str(model), "merged"]) == 0
    merged = AutoModelForCausalLM.from_pretrained("merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert "library_name: transformers" in (elsewhere / "merged" / "README.md").read_text()
    assert main(["merge-adapter", str(model), "merged2", "--base", str(user / "models" / "base")]) == 0
    assert AutoTokenizer.from_pretrained("merged2").chat_template == CHATML


def test_init_model_with_a_chat_template(hh_path, tmp_path):
    from prefopt.tiny import init_model

    for name, end in (("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")):
        out = init_model(tmp_path / name, [str(hh_path)], arch="qwen2", size="nano", vocab_size=300, max_texts=40,
                         chat_template=name)
        tokenizer = AutoTokenizer.from_pretrained(out)
        assert tokenizer.chat_template == TEMPLATES[name]
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True)
        assert len(tokenizer(end, add_special_tokens=False)["input_ids"]) == 1 and text.endswith(
            ("<|im_start|>assistant\n", "<|end_header_id|>\n\n"))
        model = AutoModelForCausalLM.from_pretrained(out)
        stops = model.generation_config.eos_token_id
        assert tokenizer.convert_tokens_to_ids(end) in (stops if isinstance(stops, list) else [stops])
        assert model.config.model_type == "qwen2" and model.get_input_embeddings().num_embeddings == len(tokenizer)


def test_init_model_reads_the_users_own_data_as_training_does(tmp_path, capsys):
    """``init-model --corpus`` takes what ``data.path`` takes (here an UltraFeedback-style parquet): every string field
    and every chat message's content is a document for the tokenizer."""
    import pandas as pd

    from prefopt.tiny import corpus_texts

    rows = [{"prompt": f"What is {i} plus {i}?", "prompt_id": f"id-{i}", "score_chosen": 8.0, "score_rejected": 2.0,
             "chosen": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": "Four."}],
             "rejected": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": "No."}]}
            for i in range(12)]
    pd.DataFrame(rows).to_parquet(tmp_path / "prefs.parquet")
    texts = list(corpus_texts([str(tmp_path / "prefs.parquet")]))
    assert texts[:3] == ["What is 0 plus 0?", "What is 0 plus 0?\nFour.", "What is 0 plus 0?\nNo."] and len(texts) == 36
    out = tmp_path / "model"
    assert main(["init-model", str(out), "--corpus", str(tmp_path / "prefs.parquet"), "--arch", "qwen2", "--size",
                 "nano", "--vocab-size", "300", "--chat-template", "chatml"]) == 0, capsys.readouterr().err
    assert json.loads((out / "prefopt_init.json").read_text())["n_texts"] == 36


def test_commands_print_their_own_lines_not_loading_bars(tmp_path, capsys):
    """``init-model`` and ``merge-adapter`` (like generate / eval, and train with progress: false) print no weight
    loading, shard writing or table building bars."""
    import datasets
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # another test's command may have turned them off for the session
    datasets.enable_progress_bars()
    try:
        (tmp_path / "corpus.txt").write_text("".join(f"line {i} of a tiny corpus\n" for i in range(40)))
        code = main(["init-model", str(tmp_path / "m"), "--corpus", str(tmp_path / "corpus.txt"), "--size", "nano",
                     "--vocab-size", "300"])
        err = capsys.readouterr().err
        assert code == 0 and "shards" not in err and "it/s" not in err, err
    finally:
        if not was[0]:
            hf_logging.disable_progress_bar()
        if not was[1]:
            datasets.disable_progress_bars()


@pytest.mark.parametrize("name", ["adamw", "adamw_fused", "adamw_8bit", "adafactor"])
def test_every_optimizer_choice_trains(name):
    """Each train.optimizer fits a least-squares problem (its library's own update; 8-bit moments on a 64x64
    weight, large enough for bitsandbytes to quantize them)."""
    from prefopt.config import TrainConfig
    from prefopt.optim import make_optimizer

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64)
    inputs, target = torch.randn(128, 64), torch.randn(128, 64)
    optimizer = make_optimizer(layer.parameters(), TrainConfig(optimizer=name, learning_rate=1e-2))
    first = None
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(layer(inputs), target)
        first = float(loss) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.8 * first
    if name == "adamw_8bit":
        assert optimizer.state[layer.weight]["state1"].dtype == torch.uint8


@pytest.mark.slow
def test_checkpoints_that_store_their_weights_once_resume_bit_for_bit(tiny_model_dir, tmp_path):
    """A2C trains its top blocks (held by model/) and a value head (not exported: trainable_rest.safetensors); 2 steps,
    checkpoint, 2 more equal 4 steps in one go, weights and every logged number."""
    from prefopt.config import build_run_config
    from prefopt.tasks import TASK_REWARD, write_task_prompts
    from prefopt.trainer import Trainer

    prompts = write_task_prompts(tmp_path / "prompts.jsonl", 32, seed=0)

    def run(out: Path, steps: int) -> list[dict]:
        Trainer(build_run_config({
            "algorithm": {"name": "a2c", "trainable_layers": 1, "preference_weight": 0.0, "rules": {},
                          "generation": {"max_new_tokens": 6}, "rewards": [TASK_REWARD]},
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"path": str(prompts), "eval_fraction": 0.0, "max_length": 64, "max_prompt_length": 48},
            "train": {"output_dir": str(out), "max_steps": steps, "batch_size": 4, "progress": False, "log_every": 1,
                      "save_every": 2, "resume": "auto", "learning_rate": 3e-3, "mixed_precision": "no"}})).fit()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
        return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows if "train/loss" in row]

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step-00000002"
    assert (checkpoint / "trainable_rest.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    assert run(tmp_path / "resumed", 4) == straight
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "model").state_dict()
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "model").state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_the_recipe_saved_with_a_model_reads_back_as_the_run_that_made_it(tmp_path):
    """``prefopt_recipe.yaml`` (every model/) is the run: read back, it is the same config (no eval data stays none,
    it does not become an empty data section)."""
    from prefopt.config import build_run_config, load_config
    from prefopt.export import recipe_text

    run = build_run_config({"algorithm": {"name": "dpo", "beta": 0.2}, "model": {"name_or_path": "models/base"},
                            "data": {"path": "prefs.parquet", "max_length": 384},
                            "train": {"output_dir": "runs/dpo", "epochs": 1}})
    (tmp_path / "prefopt_recipe.yaml").write_text(recipe_text(run))
    again = load_config(tmp_path / "prefopt_recipe.yaml")
    assert again.eval_data is None and again.to_dict() == run.to_dict()


def test_the_banner_counts_packed_sequences_and_the_card_says_where_the_recipe_runs(tmp_path, monkeypatch):
    """With data.packing a batch is packed sequences, not rows; the recipe's relative paths are relative to the
    directory the run started in, which the card names."""
    from prefopt.config import build_run_config
    from prefopt.console import banner
    from prefopt.export import model_card

    run = build_run_config({"algorithm": "sft", "model": {"name_or_path": "gpt2"},
                            "data": {"path": "chat.jsonl", "packing": True},
                            "train": {"output_dir": "runs/sft", "batch_size": 8, "max_steps": 10}})
    report = {"rows": {"train": 100, "eval": 10}, "sequences": {"train": 40, "eval": 4}, "packed": True}
    text = banner(run, torch.nn.Linear(2, 2), report, 5, 1, 1, "no")
    assert "100 train rows (40 packed sequences)" in text and "global batch 8 packed sequences (1 process x 8" in text
    monkeypatch.chdir(tmp_path)
    card = model_card(run, 10, {}, {}, adapter=False)
    assert f"`prefopt train prefopt_recipe.yaml`, run in `{tmp_path}`" in card


@pytest.mark.slow
def test_rows_skipped_for_long_prompts_are_counted_in_the_banner_with_the_keys_to_change(qwen2_window_dir, tmp_path,
                                                                                        capsys, caplog, monkeypatch):
    """A multi-turn SFT row whose prompt fills data.max_length is skipped: the banner counts the rows that train
    (it counted the rows read) and the warning names the split and the two settings that decide it."""
    rows = conversations(12) + [{"messages": [{"role": "user", "content": f"Tell me long story {i}. " * 60},
                                              {"role": "assistant", "content": "Once."}]} for i in range(4)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({
        "algorithm": "sft", "model": {"name_or_path": str(qwen2_window_dir)},
        "data": {"path": "chat.jsonl", "eval_fraction": 0.0, "max_length": 160, "max_prompt_length": 160},
        "train": {"output_dir": "runs/sft", "max_steps": 1, "batch_size": 4, "progress": False}}))
    monkeypatch.chdir(tmp_path)
    code, err = train(capsys, recipe)
    assert code == 0, err
    assert "data: 12 train rows (of 16: 4 skipped at tokenization), 0 eval rows;" in err, err
    assert ("sft train rows skipped at tokenization: 4 prompt longer than max_length of 16 (a prompt keeps up to "
            "data.max_prompt_length=160 of data.max_length=160 tokens" in caplog.text), caplog.text
    caplog.clear()
    assert main(["data", str(recipe), "data.packing=true"]) == 0  # `prefopt data` says the same, packed
    out = capsys.readouterr().out
    assert "[train] 16 records -> " in out and " packed sequences of tokens; skipped at tokenization 4: " in out, out
    assert "sft train rows skipped at tokenization: 4 prompt longer than max_length of 16" in caplog.text


@pytest.mark.slow
def test_a_folder_of_the_wrong_kind_is_refused_before_anything_is_written(qwen2_window_dir, hh_path, tmp_path,
                                                                          capsys, monkeypatch):
    """A reward model given as the policy (generate, train) sampled from a random LM head and a LoRA adapter given
    as model.name_or_path said "no trainable parameters"; `init-model` into an existing model's folder wrote a new
    model over it. Each is one line, exit 2, and nothing is written."""
    from transformers import AutoModelForSequenceClassification

    from prefopt.config import LoraConfig, ModelConfig
    from prefopt.models import load_causal_lm, load_reward_model

    monkeypatch.chdir(tmp_path)
    rm = AutoModelForSequenceClassification.from_pretrained(qwen2_window_dir, num_labels=1)
    rm.save_pretrained("rm")
    AutoTokenizer.from_pretrained(qwen2_window_dir).save_pretrained("rm")
    load_causal_lm(ModelConfig(name_or_path=str(qwen2_window_dir), lora=LoraConfig(r=4))).save_pretrained("adapter")
    load_reward_model(str(qwen2_window_dir), ModelConfig(name_or_path=str(qwen2_window_dir), lora=LoraConfig(r=4)),
                      trainable=True).save_pretrained("rm-adapter")
    shutil.copytree(qwen2_window_dir, "sft")
    before = {p.name: p.read_bytes() for p in Path("sft").iterdir()}
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi"}]}) + "\n")
    capsys.readouterr()
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump({"algorithm": "dpo", "data": {"path": str(hh_path)},
                                                        "train": {"max_steps": 1}}))
    recipe = ["train", "dpo.yaml"]
    cases = [(["generate", "--models", "rm", "--prompts", "prompts.jsonl", "--out", "r.jsonl"],
              "model 'rm' is a reward model (Qwen2ForSequenceClassification), not a causal LM"),
             (["generate", "--models", "rm-adapter", "--prompts", "prompts.jsonl", "--out", "r.jsonl"],
              "model 'rm-adapter' is a reward model's LoRA adapter (task_type SEQ_CLS), not a causal LM"),
             ([*recipe, "model.name_or_path=rm", "train.output_dir=runs/a"],
              "model.name_or_path='rm': a reward model (Qwen2ForSequenceClassification), not a causal LM"),
             ([*recipe, "model.name_or_path=adapter", "train.output_dir=runs/b"],
              "model.name_or_path='adapter': a LoRA adapter (adapter_config.json, no weights of its own): merge it"),
             (["init-model", "sft", "--corpus", str(hh_path), "--size", "nano"],
              "'sft' already holds files (chat_template.jinja, config.json, generation_config.json, "
              "model.safetensors, ...); give a new folder for the new model, or --overwrite")]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not Path("r.jsonl").exists() and not Path("runs").exists()
    assert {p.name: p.read_bytes() for p in Path("sft").iterdir()} == before
