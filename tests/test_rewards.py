"""Reward components on a hand-made rollout, and their weighted composition."""

from __future__ import annotations

import dataclasses
import re
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from prefopt.config import ModelConfig
from prefopt.errors import ConfigError, PrefoptError, UnknownNameError
from prefopt.models import load_tokenizer
from prefopt.registry import REWARDS
from prefopt.rl.rewards import CompositeReward, RewardSpec, build_component
from prefopt.scoring import RewardScorer
from prefopt.tasks import TARGET_WORDS, task_prompts, write_task_prompts
from prefopt.types import Rollout

PROMPTS = ["\n\nHuman: hi\n\nAssistant:", "\n\nHuman: tell me a joke\n\nAssistant:", "\n\nHuman: ok?\n\nAssistant:"]
RESPONSES = [" the cat is the best", "", " sure\n\nHuman: and then"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))


def make_rollout(tokenizer, prompts=PROMPTS, responses=RESPONSES, ended=(True, True, False)) -> Rollout:
    """Prompts left-padded, responses right-padded, EOS after the responses marked ``ended``."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    response_rows = [tokenizer(r, add_special_tokens=False)["input_ids"] + ([eos] if e else [])
                     for r, e in zip(responses, ended)]
    tp, tr = max(map(len, prompt_rows)), max(map(len, response_rows))
    prompt_ids = torch.full((len(prompts), tp), pad)
    response_ids = torch.full((len(prompts), tr), pad)
    prompt_mask, response_mask = torch.zeros_like(prompt_ids), torch.zeros_like(response_ids)
    for i, (p, r) in enumerate(zip(prompt_rows, response_rows)):
        prompt_ids[i, tp - len(p):], prompt_mask[i, tp - len(p):] = torch.tensor(p), 1
        response_ids[i, :len(r)], response_mask[i, :len(r)] = torch.tensor(r), 1
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                   response_mask=response_mask, logprobs=torch.zeros(response_ids.shape), ended=torch.tensor(ended),
                   prompts=list(prompts),
                   responses=list(responses), meta=[{"answer": "cat"}, {}, {}])


def component(name, tokenizer, **params):
    return build_component(RewardSpec(name, params=params), tokenizer, "cpu")


def test_builtins_are_registered():
    assert {"reward_model", "length_penalty", "format_validity", "callable", "target_token"} <= set(
        REWARDS.available())


def test_length_penalty(tokenizer):
    rollout = make_rollout(tokenizer)
    lengths = rollout.response_mask.sum(-1).float()  # tokens, EOS included
    over = component("length_penalty", tokenizer, target=3, coef=0.5)(rollout)
    torch.testing.assert_close(over, -0.5 * (lengths - 3).clamp(min=0))
    torch.testing.assert_close(over[1], torch.tensor(0.0))  # "" + EOS: 1 token, under the target
    both = component("length_penalty", tokenizer, target=3, coef=0.5, two_sided=True)(rollout)
    torch.testing.assert_close(both, -0.5 * (lengths - 3).abs())
    assert both[1] == -1.0  # |1 - 3| * 0.5


def test_format_validity(tokenizer):
    rollout = make_rollout(tokenizer)
    assert component("format_validity", tokenizer)(rollout).tolist() == [1.0, 0.0, 0.0]  # ok, empty, new turn
    penalty = component("format_validity", tokenizer, valid=0.0, invalid=-1.0)(rollout)
    assert penalty.tolist() == [0.0, -1.0, -1.0]
    markers = component("format_validity", tokenizer, markers=["cat"])(rollout)
    assert markers.tolist() == [0.0, 0.0, 1.0]


def test_target_token_fraction(tokenizer):
    rollout = make_rollout(tokenizer, responses=[" the the a", "", " cat"], ended=(True, True, False))
    the, a = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" the", " a"))
    # row 0: [the, the, a, EOS] -> 2/4 for " the", 3/4 for {the, a}; row 1: [EOS] -> 0; row 2: [" cat"...] -> 0
    assert component("target_token", tokenizer, token=" the")(rollout).tolist() == [0.5, 0.0, 0.0]
    assert component("target_token", tokenizer, token=[the, " a"])(rollout).tolist() == [0.75, 0.0, 0.0]
    assert component("target_token", tokenizer)(rollout)[0] == 0.75  # TARGET_WORDS has " the" and " a"
    with pytest.raises(ConfigError, match="is 2 tokens"):
        component("target_token", tokenizer, token=" Human")


def test_task_words_are_single_tokens_and_prompts_are_hh_style(tokenizer, tmp_path):
    for word in TARGET_WORDS:
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1
    prompts = task_prompts(50, seed=1)
    assert prompts == task_prompts(50, seed=1) and len(set(prompts)) > 40
    assert all(p.startswith("\n\nHuman: ") and p.endswith("\n\nAssistant:") for p in prompts)
    lines = write_task_prompts(tmp_path / "p.jsonl", 5).read_text().splitlines()
    assert len(lines) == 5 and lines[0].startswith('{"prompt": ')


def count_cats(prompts, completions, answer=None, **kwargs):
    """A TRL-style reward function: the data's ``answer`` column comes as a keyword argument."""
    return [float(c.count("cat")) + (10.0 if a == "cat" else 0.0) for c, a in zip(completions, answer)]


def test_callable_imports_module_function(tokenizer, tmp_path, monkeypatch):
    source = ("def exclaim(prompts, completions, **kwargs):\n"
              "    return [len(p) % 7 + c.count('!') for p, c in zip(prompts, completions)]\n")
    (tmp_path / "my_rewards.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    rollout = make_rollout(tokenizer, responses=["wow!!", "", "!"])
    values = component("callable", tokenizer, fn="my_rewards:exclaim")(rollout)
    assert values.tolist() == [len(p) % 7 + n for p, n in zip(PROMPTS, [2, 0, 1])]
    assert component("callable", tokenizer, fn=count_cats)(make_rollout(tokenizer)).tolist() == [11.0, 0.0, 0.0]
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize("spec, message", [("no_colon", "expected 'module:function'"),
                                           ("no_such_module_xyz:f", "cannot import module"),
                                           ("prefopt.tasks:no_such_function", "has no function")])
def test_callable_errors_say_what_is_missing(tokenizer, spec, message):
    with pytest.raises(ConfigError, match=message):
        component("callable", tokenizer, fn=spec)


def test_callable_must_return_one_value_per_response(tokenizer):
    reward = component("callable", tokenizer, fn=lambda completions, **kwargs: [1.0])
    with pytest.raises(PrefoptError, match="one float or None per response"):
        reward(make_rollout(tokenizer))


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    """A random-init scalar RM on the tiny GPT-2, saved as the reward stage saves it."""
    out = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    rm.config.pad_token_id = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir))).pad_token_id
    rm.save_pretrained(out)
    load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir))).save_pretrained(out)
    return out


def test_reward_model_scores_prompt_plus_response_text(tokenizer, reward_model_dir):
    rollout = make_rollout(tokenizer)
    scores = component("reward_model", tokenizer, path=str(reward_model_dir))(rollout)
    scorer = RewardScorer(AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval())
    eos = [tokenizer.eos_token_id]
    for i, ended in enumerate([True, True, False]):  # EOS appended only where the response ended with it
        ids = (tokenizer(PROMPTS[i], add_special_tokens=False)["input_ids"]
               + tokenizer(RESPONSES[i], add_special_tokens=False)["input_ids"] + (eos if ended else []))
        with torch.no_grad():
            expected = scorer(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        torch.testing.assert_close(scores[i:i + 1], expected, atol=1e-5, rtol=0)
    one_at_a_time = component("reward_model", tokenizer, path=str(reward_model_dir), batch_size=1)(rollout)
    torch.testing.assert_close(one_at_a_time, scores, atol=1e-5, rtol=0)  # padding does not change a score
    assert scores.dtype == torch.float32 and scores.std() > 0


def test_composite_is_the_weighted_sum_and_logs_each_component(tokenizer):
    rollout = make_rollout(tokenizer)
    specs = [RewardSpec("format_validity", weight=2.0),
             {"name": "length_penalty", "weight": 0.5, "params": {"target": 0, "coef": 1.0}},
             {"name": "callable", "weight": -1.0, "params": {"fn": count_cats}},
             {"name": "callable", "weight": 3.0, "params": {"fn": lambda completions, **kw: [1.0] * len(completions)}}]
    reward = CompositeReward(specs, tokenizer, "cpu")
    total, parts = reward(rollout)
    assert list(parts) == ["format_validity", "length_penalty", "count_cats", "callable"]
    lengths = rollout.response_mask.sum(-1).float()
    torch.testing.assert_close(parts["length_penalty"], -lengths)
    expected = 2.0 * torch.tensor([1.0, 0.0, 0.0]) - 0.5 * lengths - torch.tensor([11.0, 0.0, 0.0]) + 3.0
    torch.testing.assert_close(total, expected)


def test_composite_errors_name_the_component(tokenizer):
    with pytest.raises(ConfigError, match="rewards is empty"):
        CompositeReward([], tokenizer, "cpu")
    with pytest.raises(UnknownNameError, match="length_penalty"):
        CompositeReward([{"name": "lenght_penalty"}], tokenizer, "cpu")
    with pytest.raises(ConfigError, match="'length_penalty'.*unexpected keyword argument 'limit'"):
        CompositeReward([{"name": "length_penalty", "params": {"limit": 3}}], tokenizer, "cpu")


def test_a_new_component_is_one_class_and_one_decorator(tokenizer):
    @REWARDS.register("test_constant")
    class Constant:
        def __init__(self, tokenizer, device, value: float = 1.0):
            self.value = value

        def __call__(self, rollout):
            return torch.full((len(rollout.responses),), self.value)

    try:
        total, parts = CompositeReward([RewardSpec("test_constant", 2.0, {"value": 0.25})], tokenizer, "cpu")(
            make_rollout(tokenizer))
        assert total.tolist() == [0.5, 0.5, 0.5] and parts["test_constant"].tolist() == [0.25] * 3
    finally:
        REWARDS.unregister("test_constant")



# ------------------------------------------------------------------------------------------------ TRL reward functions
def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format (TRL's documentation, unchanged)."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def accuracy_reward(completions, solution, **kwargs):
    """TRL-style: the ``solution`` column as a keyword argument; None where there is nothing to check against."""
    contents = [completion[0]["content"] for completion in completions]
    return [None if s is None else float(s in c) for c, s in zip(contents, solution)]


def old_style(prompts, responses, meta):
    return [0.0] * len(responses)


CHAT = [[{"role": "user", "content": "2+2?"}], [{"role": "system", "content": "Be exact."},
                                                 {"role": "user", "content": "3+3?"}]]


def chat_rollout(tokenizer):
    """Two prompts x two samples, chat messages as the data gave them, a ``solution`` column (None for prompt 1)."""
    responses = ["<think>easy</think><answer>4</answer>", "four", "<think>hm</think><answer>6</answer>", "6"]
    rollout = make_rollout(tokenizer, prompts=["p"] * 4, responses=responses, ended=(True,) * 4)
    return dataclasses.replace(rollout, raw_prompts=[CHAT[0], CHAT[0], CHAT[1], CHAT[1]],
                               meta=[{"solution": "4"}, {"solution": "4"}, {}, {}],
                               group=torch.tensor([0, 0, 1, 1]))


def test_trl_reward_functions_work_unchanged_and_none_is_handled_as_trl_does(tokenizer):
    """Completions of chat prompts come as assistant messages, columns as keyword arguments; a None is NaN in its
    component (logged nan-aware), the total sums the components that scored; a response no component scored takes
    its group's mean, so its advantage is 0 (TRL: excluded from the baseline, advantage 0)."""
    rollout = chat_rollout(tokenizer)
    total, parts = CompositeReward([{"name": "callable", "params": {"fn": format_reward_func}},
                                    {"name": "callable", "weight": 2.0, "params": {"fn": accuracy_reward},
                                     "label": "accuracy"}], tokenizer, "cpu")(rollout)
    assert list(parts) == ["format_reward_func", "accuracy"]
    assert parts["format_reward_func"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert parts["accuracy"][:2].tolist() == [1.0, 0.0] and parts["accuracy"][2:].isnan().all()
    assert total.tolist() == [3.0, 0.0, 1.0, 0.0]  # rows 2, 3: only the format term scored them
    alone, _ = CompositeReward([{"name": "callable", "params": {"fn": accuracy_reward}}], tokenizer, "cpu")(rollout)
    assert alone.tolist() == [1.0, 0.0, 0.0, 0.0]  # group 1: nothing scored, 0
    rollout.meta[1] = {}  # row 1 unscored: it takes row 0's score, the mean of its group's scored rows
    alone, _ = CompositeReward([{"name": "callable", "params": {"fn": accuracy_reward}}], tokenizer, "cpu")(rollout)
    assert alone.tolist() == [1.0, 1.0, 0.0, 0.0]
    strings = make_rollout(tokenizer)  # string prompts: completions are strings, as in TRL's standard format
    lengths = component("callable", tokenizer, fn=lambda completions, **kw: [len(c) for c in completions])(strings)
    assert lengths.tolist() == [float(len(r)) for r in RESPONSES]


def test_a_reward_function_is_checked_when_the_recipe_is_read_and_recorded_by_its_import_path():
    from prefopt.config import build_run_config

    def recipe(fn):
        return {"algorithm": {"name": "grpo", "rewards": [{"name": "callable", "params": {"fn": fn}}]},
                "model": {"name_or_path": "no-such-model"}}

    with pytest.raises(ConfigError, match=r"old_style\(prompts, responses, meta\) cannot be called as TRL calls"):
        build_run_config(recipe(f"{__name__}:old_style"))
    config = build_run_config(recipe(count_cats))
    assert config.to_dict()["algorithm"]["rewards"][0]["params"]["fn"] == f"{__name__}:count_cats"
    with pytest.raises(UnknownNameError, match="length_penalty"):
        build_run_config({**recipe(count_cats), "algorithm": {"name": "grpo", "rewards": [{"name": "lenght_penalty"}]}})


def test_a_reward_module_in_the_working_directory_is_importable_from_the_prefopt_command(tmp_path, monkeypatch,
                                                                                         capsys):
    """The console script does not put the working directory on sys.path (``python -m`` does): ``prefopt eval
    --judge module:function`` must still find a module there, as ``prefopt train`` finds one beside the recipe."""
    from prefopt.cli import main

    (tmp_path / "cwd_reward_22.py").write_text("def score(prompts, completions, **kwargs):\n"
                                               "    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cwd_reward_22", raising=False)
    code = main(["eval", "--judge", "cwd_reward_22:score", "--replies", "missing.jsonl", "--out", "out"])
    err = capsys.readouterr().err
    assert code == 2 and "replies file 'missing.jsonl' not found" in err, err  # the judge was imported
    monkeypatch.delitem(sys.modules, "cwd_reward_22", raising=False)


def test_a_judge_is_named_by_its_label_as_the_training_logs_name_it():
    """``label`` names a component in the training logs (reward/<label>) and its column in ``prefopt eval``."""
    from prefopt.judge.inputs import judge_names, judge_specs

    specs = judge_specs(["{name: length_penalty, label: brevity}", "length_penalty", "format_validity"])
    assert judge_names(specs) == ["brevity", "length_penalty", "format_validity"]
