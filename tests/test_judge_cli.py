"""``prefopt generate`` and ``prefopt eval`` end to end on the realistic ChatML fixture (qwen2-window) and a second
model with its tokenizer: seeded bytes, the baseline's replies alone or beside another model, a win rate recomputed
by hand from the replies, eval on the fly equal to eval of the saved replies, KL and preference accuracy of the
reference, and bad files as one-line errors naming the file and line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from prefopt.cli import main
from realistic import build

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

PROMPTS = [{"prompt": [{"role": "user", "content": "How do I bake bread?"}]},
           {"prompt": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "What is the capital of France?"}], "answer": "Paris"},
           {"prompt": "Tell me a joke."},
           {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                       {"role": "user", "content": "Can you help me?"}]},
           {"prompt": [{"role": "user", "content": "Name a color."}]}]
SAMPLING = ["--samples", "2", "--batch-size", "2", "--max-new-tokens", "6", "--seed", "5"]
JUDGE = '''
def text(completion):
    """TRL's completions: a string for a string prompt, [assistant message] for a chat prompt."""
    return completion if isinstance(completion, str) else completion[0]["content"]


def characters(prompts, completions, **kwargs):
    """A hand-made judge: the reply's length in characters."""
    return [float(len(text(c))) for c in completions]


def has_e(prompts, completions, **kwargs):
    """A verifiable rule: 1 when the reply holds the letter e."""
    return [1.0 if "e" in text(c) else 0.0 for c in completions]
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory, qwen2_window_dir, hh_path):
    root = tmp_path_factory.mktemp("judge-cli")
    other = build("qwen2-window", root / "qwen2-other", [str(hh_path)], max_texts=800, seed=1)  # same tokenizer
    sharp = AutoModelForCausalLM.from_pretrained(other)  # random inits are near uniform: sharpen its logits 6x
    sharp.model.norm.weight.data *= 6
    sharp.save_pretrained(other)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    (root / "eval_judges.py").write_text(JUDGE)
    return {"root": root, "start": str(qwen2_window_dir), "other": str(other), "prompts": str(prompts)}


@pytest.fixture
def judges(files, monkeypatch):
    monkeypatch.syspath_prepend(str(files["root"]))  # a reward module beside the user's files


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def generate(files, out: Path, *models: str) -> Path:
    assert main(["generate", "--models", *models, "--prompts", files["prompts"], "--out", str(out), *SAMPLING]) == 0
    return out


def test_generate_is_seeded_and_the_baseline_is_the_same_alone_or_beside_another_model(files, tmp_path):
    start, other = f"start={files['start']}", f"other={files['other']}"
    both = generate(files, tmp_path / "both.jsonl", start, other)
    again = generate(files, tmp_path / "again.jsonl", start, other)
    alone = generate(files, tmp_path / "alone.jsonl", start)
    assert both.read_bytes() == again.read_bytes()
    rows = read_jsonl(both)
    assert len(rows) == 2 * 5 * 2 and {r["model"] for r in rows} == {"start", "other"}
    assert [r for r in rows if r["model"] == "start"] == read_jsonl(alone)
    first = rows[0]
    assert first["prompt"] == PROMPTS[0]["prompt"] and first["seed"] == 5 and rows[1]["seed"] == 5 + 104729
    assert rows[2]["meta"] == {"answer": "Paris"} and rows[4]["prompt"] == "Tell me a joke."
    assert all(r["length"] == len(r["response_ids"]) for r in rows)
    manifest = json.loads((tmp_path / "both.manifest.json").read_text())
    assert manifest["models"] == {"start": files["start"], "other": files["other"]}
    assert manifest["generation"]["max_new_tokens"] == 6 and manifest["prompts"][0]["sha256"]
    assert main(["generate", "--models", start, "--prompts", files["prompts"], "--out", str(alone)]) == 2  # exists


def test_eval_win_rate_by_hand_kl_pass_at_k_and_pairs(files, judges, tmp_path, capsys, hh_head):
    replies = generate(files, tmp_path / "replies.jsonl", f"start={files['start']}", f"other={files['other']}")
    out = tmp_path / "eval"
    assert main(["eval", "--replies", str(replies), "--judge", "eval_judges:characters", "--judge",
                 "eval_judges:has_e", "--baseline", "start", "--reference", "start", "--pairs", str(hh_head(6)),
                 "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "win_rate" in table and "pref_acc" in table and "0.500 [0.500, 0.500]" in table
    summary = json.loads((out / "summary.json").read_text())
    rows = read_jsonl(replies)
    score = {(r["model"], r["prompt_index"], r["sample"]): len(r["response"]) for r in rows}
    wins = [[1.0 if score["other", i, j] > score["start", i, j] else 0.5 if score["other", i, j] ==
             score["start", i, j] else 0.0 for j in range(2)] for i in range(5)]
    per_prompt = [sum(w) / 2 for w in wins]
    mean = sum(per_prompt) / 5
    se = math.sqrt(sum((w - mean) ** 2 for w in per_prompt) / 4 / 5)
    other, start = summary["models"]["other"], summary["models"]["start"]
    assert len(set(per_prompt)) > 1  # wins, ties and losses: the hand count is not a constant 0.5
    assert other["win_rate"] == pytest.approx(mean)
    assert other["win_rate_ci"] == pytest.approx([max(mean - 1.959964 * se, 0), min(mean + 1.959964 * se, 1)])
    assert other["characters"] == pytest.approx(sum(score["other", i, j] for i in range(5) for j in range(2)) / 10)
    assert other["has_e"] == pytest.approx(sum("e" in r["response"] for r in rows if r["model"] == "other") / 10)
    assert "pass@1" not in other  # the first judge is the score, and a character count is not verifiable
    assert start["win_rate"] == 0.5 and start["kl"] == 0.0 and start["implicit_acc"] == 0.5
    assert other["kl"] != 0.0 and other["pairs"] == 6 and 0.0 <= other["implicit_acc"] <= 1.0
    prompts = read_jsonl(out / "prompts.jsonl")
    assert [p["win_rate"] for p in prompts if p["model"] == "other"] == pytest.approx(per_prompt)
    assert len(read_jsonl(out / "pairs.jsonl")) == 12 and len(read_jsonl(out / "replies.jsonl")) == 20


def test_eval_on_the_fly_equals_eval_of_the_saved_replies_and_pass_at_k(files, judges, tmp_path):
    replies = generate(files, tmp_path / "replies.jsonl", f"start={files['start']}", f"other={files['other']}")
    judged = ["--judge", "eval_judges:has_e", "--baseline", "start", "--reference", "start"]
    assert main(["eval", "--replies", str(replies), *judged, "--batch-size", "2", "--out", str(tmp_path / "a")]) == 0
    assert main(["eval", "--models", f"start={files['start']}", f"other={files['other']}", "--prompts",
                 files["prompts"], *SAMPLING, *judged, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "prompts.jsonl").read_bytes() == (tmp_path / "b" / "prompts.jsonl").read_bytes()
    correct = {(r["model"], r["prompt_index"]): 0 for r in read_jsonl(replies)}
    for r in read_jsonl(replies):
        correct[r["model"], r["prompt_index"]] += "e" in r["response"]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())["models"]
    for model in ("start", "other"):  # 2 samples: pass@1 = c / 2, pass@2 = [c > 0]
        assert summary[model]["pass@1"] == pytest.approx(sum(correct[model, i] / 2 for i in range(5)) / 5)
        assert summary[model]["pass@2"] == pytest.approx(sum(correct[model, i] > 0 for i in range(5)) / 5)


@pytest.mark.parametrize("lines, where", [
    (['{"prompt": "Hi"}', '{"prompt": "Hello"}', '{"prompt": "Hey"'], "prompts.jsonl:3: invalid JSON"),
    (['{"prompt": "Hi"}', '{"prompt": [{"role": "robot", "content": "x"}]}'], "prompts.jsonl:2: "),
    (['{"prompt": "Hi"}', '{"question": "Hello"}'], "prompts.jsonl:2: "),
])
def test_a_bad_prompts_file_is_one_line_naming_the_file_and_line(files, tmp_path, capsys, lines, where):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    assert main(["generate", "--models", files["start"], "--prompts", str(bad), "--out", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("prefopt: error: ") and f"{tmp_path}/{where}" in err
    assert not (tmp_path / "r.jsonl").exists()


def test_bad_replies_and_judges_are_one_line_errors(files, tmp_path, capsys, llama_chat_dir):
    replies = generate(files, tmp_path / "replies.jsonl", files["start"])
    lines = replies.read_text().splitlines()
    lines[3] = lines[3].replace('"response_ids"', '"ids"')
    replies.write_text("\n".join(lines) + "\n")
    cases = [(["--replies", str(replies)], f"{replies}:4: field 'response_ids'"),
             (["--replies", str(tmp_path / "none.jsonl")], "not found"),
             (["--models", files["start"], "--prompts", files["prompts"], "--judge", "lenght_penalty"], "length_penalty"),
             (["--models", files["start"], "--prompts", files["prompts"], "--judge", "{name: format_validity, x: 1}"],
              "--judge.x"),
             (["--models", files["start"], "--prompts", files["prompts"], "--baseline", "start"], "needs a --judge"),
             (["--models", files["start"], "--prompts", files["prompts"], "--reference", str(llama_chat_dir)],
              "has another vocabulary than model"),
             (["--models", files["start"], "--prompts", files["prompts"], "--judge",
               f"{{name: reward_model, params: {{path: {files['start']}}}}}"], "has no trained score head")]
    for n, (args, message) in enumerate(cases):
        assert main(["eval", *args, "--out", str(tmp_path / f"out{n}")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
