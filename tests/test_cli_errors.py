"""Every user error is one line ``prefopt: error: ...`` naming the problem, exit code 2, no traceback.

Runs ``prefopt.cli.main`` in-process on bad recipes, overrides, data files and tokenizers. The policy per case:

* a problem with a whole file (missing, not JSON lines, truncated gzip, non-UTF-8 bytes, a format that cannot
  give the algorithm's rows) is an error naming the file and the line;
* a bad row (invalid JSON, wrong field types, missing fields, empty strings, prompt-only, a prompt leaving no
  room for a response) is skipped and counted with its ``file:line`` in the run log and manifest.json; a file
  with NO usable row is an error naming the reasons and where they occurred;
* a tokenizer without a pad token pads with its eos token (a warning says so); one with neither is an error;
* unknown names and keys list the closest match; out-of-range values name the key and the rule.

Anything unforeseen inside ``prefopt train`` prints one line with the exception type and a hint, exit 1.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from prefopt.cli import main

PAIR = {"prompt": "\n\nHuman: Hi there.\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."}


@pytest.fixture(scope="module")
def files(hh_path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-inputs")
    with gzip.open(hh_path, "rt", encoding="utf-8") as lines:
        good = [json.loads(line) for line, _ in zip(lines, range(30))]

    def jsonl(name: str, rows: list) -> Path:
        path = root / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return path

    long_prompt = {**PAIR, "prompt": "\n\nHuman: " + " ".join(f"word{i}" for i in range(400)) + "\n\nAssistant:"}
    raw = gzip.compress(jsonl("whole.jsonl", good).read_bytes())
    (root / "truncated.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    (root / "latin1.jsonl").write_bytes(json.dumps(PAIR).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    (root / "table.jsonl").write_text("prompt,chosen,rejected\nhi,hello,go away\n")
    return {
        "good": jsonl("good.jsonl", good),
        "truncated": root / "truncated.jsonl.gz",
        "latin1": root / "latin1.jsonl",
        "table": root / "table.jsonl",
        "text": jsonl("text.jsonl", [{"text": "just a document"}]),
        "invalid_json": jsonl("invalid_json.jsonl", ['{"prompt": "p", "chosen": " a"', "not json"]),
        "types": jsonl("types.jsonl", [{**PAIR, "prompt": 1}, {**PAIR, "prompt": 2}]),
        "missing": jsonl("missing.jsonl", [{"prompt": "p", "chosen": " a"}]),
        "empty": jsonl("empty.jsonl", [{**PAIR, "chosen": ""}, {**PAIR, "rejected": "   "}]),
        "prompt_only": jsonl("prompt_only.jsonl", [{"prompt": "p1"}, {"prompt": "p2"}]),
        "long": jsonl("long.jsonl", [long_prompt]),
        # 30 good HH rows, then one bad row of each kind (lines 31-36)
        "mixed": jsonl("mixed.jsonl", [*good, "{not json", {**PAIR, "prompt": 1}, {"prompt": "p", "chosen": " a"},
                                       {**PAIR, "chosen": ""}, {"prompt": "p"}, long_prompt]),
    }


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Copies of the nano model whose tokenizer lacks a pad token, or a pad and an eos token."""
    out = {}
    for name, drop in (("no_pad", ["pad_token"]), ("no_pad_no_eos", ["pad_token", "eos_token", "bos_token",
                                                                      "unk_token"])):
        path = tmp_path_factory.mktemp(name) / "model"
        shutil.copytree(tiny_model_dir, path)
        config = json.loads((path / "tokenizer_config.json").read_text())
        for key in drop:
            config.pop(key, None)
        (path / "tokenizer_config.json").write_text(json.dumps(config))
        out[name] = path
    return out


def run(capsys, *args: str) -> tuple[int, str]:
    """``prefopt train`` with the given overrides; returns (exit code, stderr)."""
    code = main(["train", "", *args])
    return code, capsys.readouterr().err


def base(model: Path, out: Path, data: Path | str) -> list[str]:
    return ["algorithm.name=dpo", f"model.name_or_path={model}", f"data.path={data}", f"train.output_dir={out}",
            "train.max_steps=1", "train.progress=false", "data.max_length=128", "data.max_prompt_length=64",
            "train.save_model=false", "train.mixed_precision=no"]


def error_line(code: int, stderr: str) -> str:
    """The one error line; fails unless the exit code is 2 and nothing else (no traceback) was printed."""
    lines = [line for line in stderr.splitlines() if line.startswith("prefopt:") or "Traceback" in line]
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("prefopt: error: "), stderr
    return lines[0]


FILE_ERRORS = [  # (file, extra overrides, what the message must contain)
    ("nowhere", [], ["data file", "nowhere.jsonl' not found"]),
    ("table", [], ["table.jsonl: not a JSON lines file (line 1: 'prompt,chosen,rejected')"]),
    ("text", [], ["text.jsonl:1: format 'text' (text rows) cannot be converted to kind 'pairs'"]),
    ("truncated", [], ["truncated.jsonl.gz: truncated or corrupt gzip after line"]),
    ("invalid_json", [], ["invalid_json.jsonl: not a JSON lines file (line 1:", "no line holds a JSON object"]),
    ("latin1", [], ["latin1.jsonl line 2: not valid UTF-8"]),
    ("types", [], ["no usable pairs rows in", "2 pairs: field 'prompt' is not a string", "types.jsonl:1", "types.jsonl:2"]),
    ("missing", [], ["no usable pairs rows in", "missing field 'rejected'", "missing.jsonl:1"]),
    ("empty", [], ["no usable pairs rows in", "2 pairs: empty response", "empty.jsonl:1", "empty.jsonl:2"]),
    ("prompt_only", [], ["no usable pairs rows in", "2 prompts: prompt-only row", "prompt_only.jsonl:1"]),
    # the prompt fills max_length when it may take all of it: no room for a response, the row is skipped
    ("long", ["data.max_prompt_length=128", "data.eval_fraction=0"],
     ["long.jsonl (train rows): no pairs rows left after tokenization", "'prompt longer than max_length': 1"]),
    ("good", ["data.format=hhh"], ["unknown data.format 'hhh'; known: auto, hh, pairs"]),
]


@pytest.mark.parametrize("name, extra, expected", FILE_ERRORS, ids=[case[0] for case in FILE_ERRORS])
def test_bad_data_file(name, extra, expected, files, tiny_model_dir, tmp_path, capsys):
    data = files.get(name, tmp_path / f"{name}.jsonl")
    line = error_line(*run(capsys, *base(tiny_model_dir, tmp_path, data), *extra))
    for part in expected:
        assert part in line


CONFIG_ERRORS = [
    (["algorithm.name=dpx"], "unknown algorithm 'dpx'. Did you mean 'dpo'? Known: "),
    (["algorithm.loss=sigmod"], "unknown pairwise loss 'sigmod'. Did you mean 'sigmoid'? Known: "),
    (["algorithm.loss_params={tau: 1}"], "algorithm.loss_params.tau: loss 'sigmoid' has no parameter 'tau'"),
    (["train.max_step=3"], "unknown config key 'train.max_step'; did you mean 'max_steps'?"),
    (["trian.max_steps=3"], "unknown section 'trian'; did you mean 'train'?"),
    (["algorithm.beta=-0.1"], "algorithm.beta=-0.1: must be > 0"),
    (["train.batch_size=0"], "train.batch_size=0: must be > 0"),
    (["train.max_steps=ten"], "train.max_steps='ten': expected an integer"),
    (["train.on_nonfinite=ignore"], "train.on_nonfinite='ignore': must be one of 'skip', 'stop'"),
    (["data.eval_fraction=1.5"], "data.eval_fraction=1.5: must be in [0, 1)"),
    (["train.resume=/nonexistent/step-1"], "train.resume='/nonexistent/step-1': not a complete checkpoint"),
    # issue 14: config holes that used to train, or fail late as "unexpected"
    (["train.resume=autp"], "train.resume='autp': not a complete checkpoint (no such directory); use auto, no, or "
                            "a checkpoints/step-N directory; did you mean 'auto'?"),
    (["train.learning_rate=inf"], "train.learning_rate=inf: must be a finite number"),
    (["algorithm.beta=.inf"], "algorithm.beta=inf: must be a finite number"),
    (["algorithm.beta=.nan"], "algorithm.beta=nan: must be a finite number"),
    (["train.lr_scheduler=cosin"], "train.lr_scheduler='cosin': unknown scheduler; did you mean 'cosine'?"),
    (["train.save_every=-1"], "train.save_every=-1: must be >= 0"),
    (["train.eval_every=-2"], "train.eval_every=-2: must be >= 0"),
    (["train.weight_decay=-0.1"], "train.weight_decay=-0.1: must be >= 0"),
    (["train.num_workers=2"], "unknown config key 'train.num_workers'"),
    (["train.max_skipped_updates=0"], "train.max_skipped_updates=0: must be > 0"),
]


@pytest.mark.parametrize("extra, expected", CONFIG_ERRORS, ids=[case[0][0] for case in CONFIG_ERRORS])
def test_bad_config(extra, expected, files, tiny_model_dir, tmp_path, capsys):
    line = error_line(*run(capsys, *base(tiny_model_dir, tmp_path, files["good"]), *extra))
    assert expected in line


def test_bad_recipe_files(tmp_path, capsys):
    line = error_line(main(["train", str(tmp_path / "none.yaml")]), capsys.readouterr().err)
    assert f"recipe '{tmp_path / 'none.yaml'}' not found" in line
    broken = tmp_path / "broken.yaml"
    broken.write_text("algorithm: {name: dpo\n")
    line = error_line(main(["train", str(broken)]), capsys.readouterr().err)
    assert f"{broken}: not valid YAML" in line
    listed = tmp_path / "list.yaml"
    listed.write_text("- dpo\n")
    line = error_line(main(["train", str(listed)]), capsys.readouterr().err)
    assert "a recipe is a mapping with sections algorithm, model, data, train" in line


def test_bad_model_and_tokenizer(files, tokenizers, tmp_path, capsys):
    line = error_line(*run(capsys, *base(tmp_path / "no-model", tmp_path, files["good"])))
    assert f"model.name_or_path '{tmp_path / 'no-model'}': the folder does not exist" in line
    line = error_line(*run(capsys, *base(tokenizers["no_pad_no_eos"], tmp_path, files["good"])))
    assert "has no pad or eos token" in line


def test_tokenizer_without_pad_token_pads_with_eos(tokenizers):
    from prefopt.config import ModelConfig
    from prefopt.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tokenizers["no_pad"])))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"


def test_bad_rows_are_skipped_counted_and_reported(files, tiny_model_dir, tmp_path, capsys, caplog):
    """One run on good rows plus one bad row of each kind: it trains, and the log and manifest say what was skipped."""
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        code, stderr = run(capsys, *base(tiny_model_dir, out, files["mixed"]), "data.max_prompt_length=128",
                           "data.eval_fraction=0", "train.batch_size=8")
    assert code == 0, stderr
    mixed = files["mixed"]
    reasons = json.loads((out / "manifest.json").read_text())["manifests"]["train"]["skipped"]["reasons"]
    assert reasons["invalid JSON"] == {"count": 1, "examples": [f"{mixed}:31"]}
    assert reasons["pairs: field 'prompt' is not a string"] == {"count": 1, "examples": [f"{mixed}:32"]}
    assert reasons["pairs: missing field 'rejected'"] == {"count": 1, "examples": [f"{mixed}:33"]}
    assert reasons["pairs: empty response"]["examples"][-1] == f"{mixed}:34"
    assert reasons["prompts: prompt-only row"] == {"count": 1, "examples": [f"{mixed}:35"]}
    tokenization = json.loads((out / "manifest.json").read_text())["tokenization_skipped"]["train"]
    assert tokenization["prompt longer than max_length"] >= 1  # line 36 (and long HH prompts): at tokenization
    assert "invalid JSON" in caplog.text and "prompt-only row" in caplog.text
    assert "rows skipped at tokenization" in caplog.text


def test_unexpected_error_is_one_line_with_a_hint(files, tiny_model_dir, tmp_path, capsys, monkeypatch):
    def broken_fit(self):
        raise RuntimeError("something nobody foresaw\nsecond line")

    monkeypatch.setattr("prefopt.trainer.Trainer.fit", broken_fit)
    monkeypatch.delenv("PREFOPT_DEBUG", raising=False)
    args = base(tiny_model_dir, tmp_path, files["good"])
    code, stderr = run(capsys, *args)
    assert code == 1
    assert stderr.strip().splitlines() == [
        "prefopt: unexpected error: RuntimeError: something nobody foresaw second line "
        "(rerun with -v or PREFOPT_DEBUG=1 for the traceback)"]
    monkeypatch.setenv("PREFOPT_DEBUG", "1")
    code, stderr = run(capsys, *args)
    assert code == 1 and "Traceback (most recent call last)" in stderr
    last = stderr.strip().splitlines()[-1]
    assert last == "prefopt: unexpected error: RuntimeError: something nobody foresaw second line"


# ----------------------------------------------------------------------------------------------- issue 14
def test_max_length_beyond_the_model_context(files, gpt2_real_dir, tmp_path, capsys):
    line = error_line(*run(capsys, *base(gpt2_real_dir, tmp_path / "run", files["good"]), "data.max_length=1024"))
    assert line == (f"prefopt: error: data.max_length=1024: longer than the context of {gpt2_real_dir} "
                    "(512 positions); set data.max_length <= 512")
    assert not (tmp_path / "run").exists()  # refused before the model is loaded or anything written


def online(name: str, model: Path, data: Path, out: Path) -> list[str]:
    return [f"algorithm.name={name}", f"model.name_or_path={model}", f"data.path={data}", f"train.output_dir={out}",
            "train.progress=false", "train.max_steps=1", "train.mixed_precision=no"]


def test_a_causal_lm_given_as_reward_model(files, gpt2_real_dir, tiny_model_dir, tmp_path, capsys):
    rewards = f"algorithm.rewards=[{{name: reward_model, params: {{path: {gpt2_real_dir}}}}}]"
    line = error_line(*run(capsys, *online("ppo", tiny_model_dir, files["good"], tmp_path / "run"), rewards))
    assert line == (f"prefopt: error: algorithm.rewards[0].params.path='{gpt2_real_dir}': not a reward model "
                    "(GPT2LMHeadModel has no score head); train one with algorithm.name=reward and give its model/ "
                    "directory")


def test_an_online_algorithm_without_any_reward(files, tiny_model_dir, tmp_path, capsys):
    line = error_line(*run(capsys, *online("a2c", tiny_model_dir, files["good"], tmp_path / "run"),
                           "algorithm.preference_weight=0", "algorithm.rules={}"))
    assert line == ("prefopt: error: algorithm 'a2c' has no reward: every term's weight is 0 (preference: 0); it "
                    "would train on a reward of 0")


def test_recipe_text_is_parsed_before_variables_are_expanded(files, tiny_model_dir, tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    common = (f"algorithm: {{name: dpo}}\nmodel: {{name_or_path: {tiny_model_dir}}}\n")
    # a variable fills a value, never a section
    monkeypatch.setenv("PREFOPT_TEST_SECTION", "{path: elsewhere}")
    recipe.write_text(common + "data: ${PREFOPT_TEST_SECTION}\n")
    line = error_line(main(["train", str(recipe)]), capsys.readouterr().err)
    assert line == ("prefopt: error: data: expected a mapping of keys, got str (the value of data comes from "
                    "${PREFOPT_TEST_SECTION} = '{path: elsewhere}')")
    # an unset variable without a default is an error (it used to become "")
    monkeypatch.delenv("PREFOPT_TEST_UNSET", raising=False)
    recipe.write_text(common + "data:\n  path: ${PREFOPT_TEST_UNSET}\n")
    line = error_line(main(["train", str(recipe)]), capsys.readouterr().err)
    assert line == (f"prefopt: error: {recipe}: data.path: environment variable PREFOPT_TEST_UNSET is not set "
                    "(write ${PREFOPT_TEST_UNSET:-default} for a default)")
    # a key given twice
    recipe.write_text(common + "train:\n  max_steps: 1\n  batch_size: 2\n  max_steps: 2\n")
    line = error_line(main(["train", str(recipe)]), capsys.readouterr().err)
    assert line == f"prefopt: error: {recipe}:6: key 'max_steps' is given twice (first on line 4)"


def test_resume_no_as_documented_in_a_recipe(files, tiny_model_dir, tmp_path, capsys):
    """YAML reads a bare ``no`` as false; ``train.resume: no`` is the documented spelling."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"algorithm: dpo\nmodel: {{name_or_path: {tiny_model_dir}}}\n"
                      f"data: {{path: {files['good']}, max_length: 128, max_prompt_length: 64}}\n"
                      f"train: {{resume: no, output_dir: {tmp_path / 'run'}, max_steps: 1, progress: false, "
                      "save_model: false, mixed_precision: no}\n")
    code = main(["train", str(recipe)])
    assert code == 0, capsys.readouterr().err


def test_unusable_paths_are_user_errors(files, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """An unreadable data file, an output_dir that is a file or cannot be created: exit 2, not "unexpected"."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    line = error_line(*run(capsys, *base(tiny_model_dir, a_file, files["good"])))
    assert line == f"prefopt: error: train.output_dir='{a_file}': {a_file} is a file, not a directory"
    line = error_line(*run(capsys, *base(tiny_model_dir, a_file / "run", files["good"])))
    assert line == f"prefopt: error: train.output_dir='{a_file / 'run'}': {a_file} is a file, not a directory"
    line = error_line(*run(capsys, *base(tiny_model_dir, "/sys/prefopt-test-run", files["good"])))
    assert line.startswith("prefopt: error: train.output_dir='/sys/prefopt-test-run': cannot create it: ")

    import builtins

    real_open = builtins.open
    locked = str(files["good"])

    def deny(path, *args, **kwargs):  # as if chmod 000 (the tests may run as root, who reads anything)
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    line = error_line(*run(capsys, *base(tiny_model_dir, tmp_path / "run", files["good"])))
    assert line == f"prefopt: error: {locked}: cannot read it: Permission denied"


def test_a_malformed_line_is_skipped_not_fatal(files, tiny_model_dir, tmp_path, capsys):
    """A lone surrogate escape (valid JSON, not encodable text) and a value nested past Python's recursion limit
    are rows to skip and count, like any bad row; they used to stop the whole run."""
    path = tmp_path / "malformed.jsonl"
    good = files["good"].read_text()
    surrogate = json.dumps({**PAIR, "chosen": " caf\ud800e"})  # json.dumps writes the escape "\ud800"
    nested = '{"prompt": "p", "chosen": ' + "[" * 100_000 + "]" * 100_000 + ', "rejected": " no"}'
    path.write_text(good + surrogate + "\n" + nested + "\n")
    out = tmp_path / "run"
    code, stderr = run(capsys, *base(tiny_model_dir, out, path), "data.eval_fraction=0")
    assert code == 0, stderr
    reasons = json.loads((out / "manifest.json").read_text())["manifests"]["train"]["skipped"]["reasons"]
    assert reasons["lone surrogate escape (not text)"] == {"count": 1, "examples": [f"{path}:31"]}
    assert reasons["JSON nested too deeply"] == {"count": 1, "examples": [f"{path}:32"]}
