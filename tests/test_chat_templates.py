"""Chat templates: conversational rows give the SAME token ids in prefopt as in TRL 1.16's DPO, SFT and KTO
trainers (their ``_prepare_dataset`` on the same rows), on the ChatML (Qwen2) and Llama-3 fixtures; HH strings
stay HH text; ``data.chat_template: none`` and a template file; online prompts as TRL renders them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.data_utils import maybe_apply_chat_template

from prefopt.config import DataConfig
from prefopt.data import load_rows
from prefopt.data.collate import IGNORE_INDEX
from prefopt.data.kinds import PAIRS, PROMPTS, SFT, TEXT, UNPAIRED

pytestmark = pytest.mark.usefixtures("one_thread")

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


PAIR_ROWS = [
    {"prompt": [SYSTEM, user("What is the capital of France?")], "chosen": [bot("Paris is the capital.")],
     "rejected": [bot("I would rather not say.")]},
    {"prompt": [user("Hi there."), bot("Hello! How can I help?"), user("Name a prime number.")],
     "chosen": [bot("Seven.")], "rejected": [bot("Eight, I think.")]},
    {"prompt": [user("How many legs does a spider have?")], "chosen": [bot("Eight legs.")],
     "rejected": [bot("A spider has six legs, like an ant.")]},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def data_cfg(path: Path, **extra) -> DataConfig:
    return DataConfig(path=str(path), eval_fraction=0.0, max_length=2048, max_prompt_length=1024, **extra)


def by_key(records: list[dict], key: str) -> dict[str, dict]:
    """Records by the content of their last ``key`` message (rows are in hash order after load_rows)."""
    return {record[key][-1]["content"]: record for record in records}


@pytest.fixture(scope="module", params=["qwen2_window_dir", "llama_chat_dir"])
def chat_model(request) -> tuple[Path, object, object]:
    path = request.getfixturevalue(request.param)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return path, tokenizer, AutoModelForCausalLM.from_pretrained(path)


def test_dpo_pairs_token_ids_equal_trl(chat_model, tmp_path):
    from trl import DPOConfig, DPOTrainer

    _, tokenizer, model = chat_model
    cfg = data_cfg(write_jsonl(tmp_path / "pairs.jsonl", PAIR_ROWS))
    records = by_key(load_rows(cfg, "pairs").train, "chosen")
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, max_length=None)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(PAIR_ROWS),
                         processing_class=tokenizer)
    assert len(trainer.train_dataset) == len(records) == 3
    for row, theirs in zip(PAIR_ROWS, trainer.train_dataset):
        ours = PAIRS.tokenize(records[row["chosen"][-1]["content"]], tokenizer, cfg)
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert ours[key] == theirs[key], key
        prompt = tokenizer.decode(ours["prompt_ids"])
        assert prompt.count(row["prompt"][-1]["content"]) == 1
        assert tokenizer.decode(ours["chosen_ids"]).startswith(row["chosen"][0]["content"])


def test_sft_messages_token_ids_equal_trl_prompt_completion(chat_model, tmp_path):
    """An OpenAI-style ``messages`` row (system turn kept) is split at its last assistant turn; with
    ``assistant_turns: last``, TRL's SFT on the same split as conversational prompt-completion gives the same input
    ids and the same loss tokens."""
    from trl import SFTConfig, SFTTrainer

    _, tokenizer, model = chat_model
    rows = [{"messages": row["prompt"] + row["chosen"]} for row in PAIR_ROWS]
    cfg = data_cfg(write_jsonl(tmp_path / "messages.jsonl", rows), assistant_turns="last")
    records = by_key(load_rows(cfg, "sft").train, "completion")
    theirs_rows = [{"prompt": row["prompt"], "completion": row["chosen"]} for row in PAIR_ROWS]
    args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, max_length=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(theirs_rows),
                         processing_class=tokenizer)
    for row, theirs in zip(PAIR_ROWS, trainer.train_dataset):
        ours = SFT.tokenize(records[row["chosen"][-1]["content"]], tokenizer, cfg)
        assert ours["input_ids"] == theirs["input_ids"]
        assert ours["labels"] == theirs["labels"]  # -100 on the prompt: the same tokens carry loss
        assert IGNORE_INDEX in ours["labels"] and ours["labels"][-1] != IGNORE_INDEX


CONVERSATIONS = [
    [SYSTEM, user("Hi there."), bot("Hello! How can I help?"), user("Name a prime number."), bot("Seven."),
     user("And an even one?"), bot("Two, the only even prime.")],
    [user("How many legs does a spider have?"), bot("Eight legs.")],
    [SYSTEM, user("Capital of France?"), bot("Paris."), user("Of Italy?"), bot("Rome.")],
]


def marked(template: str) -> str:
    """The fixture's template with ``{% generation %}`` markers around each assistant turn after its header, as
    TRL's assistant_only_loss needs them (ChatML: content + "<|im_end|>\\n"; Llama 3: content + "<|eot_id|>")."""
    if "<|im_start|>" in template:
        head, end = "'<|im_start|>' + message['role'] + '\\n'", "'<|im_end|>' + '\\n'"
    else:
        head, end = "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'", "'<|eot_id|>'"
    body = f"message['content'] + {end}"
    turn = (f"{{{{ {head} }}}}{{% if message['role'] == 'assistant' %}}{{% generation %}}{{{{ {body} }}}}"
            f"{{% endgeneration %}}{{% else %}}{{{{ {body} }}}}{{% endif %}}")
    start, stop = template.index("{% for message in messages %}"), template.index("{% endfor %}")
    return template[:start] + "{% for message in messages %}" + turn + template[stop:]


def test_sft_every_assistant_turn_carries_loss_as_trl_assistant_only_loss(chat_model, tmp_path):
    """Multi-turn conversations with system turns: input ids and loss tokens equal TRL 1.16's SFT with
    ``assistant_only_loss=True`` on the same template with generation markers (prefopt needs none)."""
    from trl import SFTConfig, SFTTrainer

    _, tokenizer, model = chat_model
    rows = [{"messages": conversation} for conversation in CONVERSATIONS]
    cfg = data_cfg(write_jsonl(tmp_path / "messages.jsonl", rows))
    records = by_key(load_rows(cfg, "sft").train, "completion")
    theirs_tokenizer = AutoTokenizer.from_pretrained(chat_model[0])
    theirs_tokenizer.chat_template = marked(tokenizer.chat_template)
    assert theirs_tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False) == tokenizer.apply_chat_template(
        CONVERSATIONS[0], tokenize=False)
    args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, max_length=None,
                     assistant_only_loss=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=theirs_tokenizer)
    for conversation, theirs in zip(CONVERSATIONS, trainer.train_dataset):
        ours = SFT.tokenize(records[conversation[-1]["content"]], tokenizer, cfg)
        assert ours["input_ids"] == theirs["input_ids"]
        assert ours["labels"] == theirs["labels"]  # TRL folds its assistant_masks into the labels
        turns = sum(message["role"] == "assistant" for message in conversation)
        assert ours["turns"] == [turns, turns]
        loss_text = tokenizer.decode([t for t in ours["labels"] if t != IGNORE_INDEX])
        assert all(m["content"] in loss_text for m in conversation if m["role"] == "assistant")
        assert not any(m["content"] in loss_text for m in conversation if m["role"] != "assistant")


def test_text_kind_of_messages_equals_trl_language_modeling(chat_model, tmp_path):
    """A ``messages`` row as a ``text`` document (pt, PPO-ptx) is the templated conversation: TRL's SFT on
    ``{messages}`` (language modelling) tokenizes it to the same ids."""
    from trl import SFTConfig, SFTTrainer

    _, tokenizer, model = chat_model
    rows = [{"messages": row["prompt"] + row["chosen"]} for row in PAIR_ROWS]
    cfg = data_cfg(write_jsonl(tmp_path / "messages.jsonl", rows))
    documents = {tuple(TEXT.tokenize(r, tokenizer, cfg)["input_ids"]) for r in load_rows(cfg, "text").train}
    args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, max_length=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    assert documents == {tuple(theirs["input_ids"]) for theirs in trainer.train_dataset}


def test_kto_unpaired_token_ids_equal_trl(chat_model, tmp_path):
    """TRL conversational KTO rows ``{prompt, completion, label}`` (and the same pairs unpaired) equal TRL's."""
    from trl import KTOConfig, KTOTrainer

    _, tokenizer, model = chat_model
    rows = [{"prompt": row["prompt"], "completion": row[key], "label": key == "chosen"}
            for row in PAIR_ROWS for key in ("chosen", "rejected")]
    cfg = data_cfg(write_jsonl(tmp_path / "kto.jsonl", rows))
    records = by_key(load_rows(cfg, "unpaired").train, "completion")
    from_pairs = by_key(load_rows(data_cfg(write_jsonl(tmp_path / "pairs.jsonl", PAIR_ROWS)), "unpaired").train,
                        "completion")
    args = KTOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, max_length=None,
                     per_device_train_batch_size=2)
    trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    assert len(trainer.train_dataset) == len(records) == len(from_pairs) == 6
    for row, theirs in zip(rows, trainer.train_dataset):
        content = row["completion"][-1]["content"]
        ours = UNPAIRED.tokenize(records[content], tokenizer, cfg)
        assert ours == UNPAIRED.tokenize(from_pairs[content], tokenizer, cfg)
        assert (ours["prompt_ids"], ours["completion_ids"]) == (theirs["prompt_ids"], theirs["completion_ids"])
        assert ours["label"] is row["label"]


def test_online_prompts_are_rendered_as_trl_renders_them(chat_model, tmp_path):
    """The ``prompts`` kind (ppo, a2c, the benchmark's generation) gives TRL's prompt text and its ids."""
    _, tokenizer, _ = chat_model
    cfg = data_cfg(write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": row["prompt"]} for row in PAIR_ROWS]))
    records = load_rows(cfg, "prompts").train
    assert len(records) == 3
    for record in records:
        feature = PROMPTS.tokenize(record, tokenizer, cfg)
        text = maybe_apply_chat_template({"prompt": record["prompt"]}, tokenizer)["prompt"]
        assert feature["prompt"] == text and text.endswith(("<|im_start|>assistant\n", "<|end_header_id|>\n\n"))
        assert feature["prompt_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_hh_strings_stay_hh_text_and_none_or_a_file_choose_the_rendering(qwen2_window_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(qwen2_window_dir)
    hh = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}
    cfg = data_cfg(write_jsonl(tmp_path / "hh.jsonl", [hh]))
    (record,) = load_rows(cfg, "pairs").train
    feature = PAIRS.tokenize(record, tokenizer, cfg)
    assert tokenizer.decode(feature["prompt_ids"]) == "\n\nHuman: Hi?\n\nAssistant:"
    assert tokenizer.decode(feature["chosen_ids"]) == " Hello.<|im_end|>"  # the string response + EOS

    path = write_jsonl(tmp_path / "chat.jsonl", PAIR_ROWS[:1])
    plain = data_cfg(path, chat_template="none")
    (record,) = load_rows(plain, "pairs").train
    feature = PAIRS.tokenize(record, tokenizer, plain)
    assert tokenizer.decode(feature["prompt_ids"]) == (
        "You answer in one short sentence.\n\nHuman: What is the capital of France?\n\nAssistant:")
    assert tokenizer.decode(feature["chosen_ids"]) == " Paris is the capital.<|im_end|>"

    template = tmp_path / "brackets.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    custom = data_cfg(path, chat_template=str(template))
    feature = PAIRS.tokenize(record, tokenizer, custom)
    # the generation prompt's trailing space merges into " Paris" in the whole conversation: as in TRL, the
    # response starts where the two token sequences part (common prefix), so the space goes with the response
    assert tokenizer.decode(feature["prompt_ids"]) == (
        "[system] You answer in one short sentence.\n[user] What is the capital of France?\n[assistant]")
    assert tokenizer.decode(feature["chosen_ids"]) == " Paris is the capital.\n"


SEEN: list[tuple] = []


def remember_prompts(prompts, completions, **kwargs) -> list[float]:
    """A TRL-style reward function that records what the rollouts hand it."""
    SEEN.extend(zip(prompts, completions))
    return [float(len(completion[0]["content"])) for completion in completions]


def test_ppo_rollouts_start_from_the_templated_prompts(qwen2_window_dir, tmp_path):
    """Online prompts go through the same rendering: PPO generates after TRL's templated prompt text, and a reward
    function gets the prompts as the data gave them (messages) and assistant-message completions, as in TRL."""
    from prefopt.config import build_run_config
    from prefopt.rl.engine import repeat_prompts
    from prefopt.trainer import Trainer

    tokenizer = AutoTokenizer.from_pretrained(qwen2_window_dir)
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": row["prompt"]} for row in PAIR_ROWS])
    recipe = {"algorithm": {"name": "ppo", "generation": {"max_new_tokens": 4}, "epochs": 1, "num_minibatches": 1,
                            "rewards": [{"name": "callable", "params": {"fn": f"{__name__}:remember_prompts"}}]},
              "model": {"name_or_path": str(qwen2_window_dir)},
              "data": {"path": str(path), "eval_fraction": 0.0},
              "train": {"output_dir": str(tmp_path / "ppo"), "max_steps": 1, "batch_size": 3, "progress": False,
                        "mixed_precision": "no", "save_model": False}}
    SEEN.clear()
    trainer = Trainer(build_run_config(recipe))
    trainer.prepare_data()
    batch = repeat_prompts(next(iter(trainer.loaders["train"])), 1)
    expected = {maybe_apply_chat_template({"prompt": row["prompt"]}, tokenizer)["prompt"] for row in PAIR_ROWS}
    assert set(batch.prompts) == expected and all(p.endswith("<|im_start|>assistant\n") for p in batch.prompts)
    trainer.fit()
    assert sorted(json.dumps(p) for p, _ in SEEN) == sorted(json.dumps(row["prompt"]) for row in PAIR_ROWS)
    assert all(c[0]["role"] == "assistant" and len(c) == 1 for _, c in SEEN)
