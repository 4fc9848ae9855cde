"""Reward sources: TRL's signature, output checks, specs, model scores, built-in tasks."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.models import load_reward_model
from alignkit.rollout.registry import TRL_EXTRAS
from alignkit.rollout.rewards import (
    FunctionReward,
    RewardFunctionError,
    build_reward_source,
    registered_rewards,
)
from alignkit.rollout.tasks import position_match

PROMPTS = ["reverse 123:", "reverse 4567:", "sort 312:"]
COMPLETIONS = ["321", "7654 extra", "123"]
ROWS = [{"answer": "321"}, {"answer": "7654"}, {"answer": "123"}]


def _raises(prompts, completions, **_):
    raise KeyError("answer_typo")


def _inf(prompts, completions, **_):
    return [1.0, float("inf"), 0.0]


def _short(prompts, completions, **_):
    return [1.0]


def _string(prompts, completions, **_):
    return [1.0, "0.5", 0.0]


def _bool(prompts, completions, **_):
    return [True, False, True]


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (_raises, r"'_raises' raised KeyError: 'answer_typo'.*prompt: 'reverse 123:'"),
        (
            _inf,
            r"'_inf' returned, for sample 1, inf: a reward must be finite.*completion: '7654 extra'",
        ),
        (_short, r"'_short' returned 1 values for 3 completions.*prompt: 'reverse 123:'"),
        (_string, r"'_string' returned, for sample 1, str '0.5', not a number"),
        (_bool, r"'_bool' returned, for sample 0, a bool \(True\)"),
    ],
)
def test_bad_outputs_name_the_function_and_a_sample(fn, message) -> None:
    with pytest.raises(RewardFunctionError, match=f"(?s){message}") as info:
        FunctionReward(fn)(PROMPTS, COMPLETIONS, ROWS)
    assert info.value.exit_code == 2
    if fn is _raises:  # the user's traceback is not chained into ours
        assert info.value.__suppress_context__


def test_row_fields_are_passed_as_columns_and_none_is_nan() -> None:
    seen = {}

    def fn(prompts, completions, answer, **rest):
        seen.update(answer=answer, rest=rest)
        return [None, 2, torch.tensor(0.25)]

    scores = FunctionReward(fn)(PROMPTS, COMPLETIONS, ROWS)
    assert seen["answer"] == ["321", "7654", "123"]
    # **rest: TRL's extras (no context given: no ids, no state, hooks that record nothing)
    assert sorted(seen["rest"]) == sorted(TRL_EXTRAS)
    assert seen["rest"]["completion_ids"] is None and seen["rest"]["trainer_state"] is None
    assert math.isnan(scores[0]) and scores[1:].tolist() == [2.0, 0.25]
    assert scores.dtype == torch.float32


def test_specs_resolve_modules_files_and_built_ins(tmp_path: Path) -> None:
    user = tmp_path / "my_reward.py"
    user.write_text(
        "def length(prompts, completions, **kw):\n    return [len(c) for c in completions]\n"
    )
    source = build_reward_source(
        [
            {"function": f"{user}:length", "weight": 0.5},
            {"function": "reverse_match", "weight": 2.0},
            {"function": "alignkit.rollout.tasks:exact_match"},
        ]
    )
    scores = source(PROMPTS, COMPLETIONS, ROWS)
    expected = [0.5 * 3 + 2 * 1 + 1, 0.5 * 10 + 2 * 0.4 + 0, 0.5 * 3 + 2 * 0 + 0]
    # "sort 312:" -> "123" vs answer "123": reverse_match only compares positions, so 1.0
    expected[2] = 0.5 * 3 + 2 * 1.0 + 1.0
    assert scores.tolist() == pytest.approx(expected)
    # under their metric names: a file's or module's function by its own name
    assert list(source.last_components) == ["length", "reverse_match", "exact_match"]
    assert {
        "reverse_match",
        "sort_match",
        "add_match",
        "assistant_helpfulness",
        "assistant_safety_cost",
    } <= set(registered_rewards())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"function": "reverse_mach"}, "did you mean 'reverse_match'"),
        ({"function": "alignkit.rollout.tasks:nope"}, "has no function 'nope'"),
        ({"function": "no_such_module_xyz:f"}, "cannot import no_such_module_xyz"),
        ({"function": "reverse_match", "model": "runs/rm"}, "exactly one of"),
        ({"function": "reverse_match", "wieght": 1}, "unknown key 'wieght'"),
        ({"function": "reverse_match", "weight": "x"}, "weight must be a finite number"),
        ({"model": "/nonexistent/run"}, "neither a reward/cost model directory"),
    ],
)
def test_bad_specs_are_config_errors(spec, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build_reward_source([spec])


def test_position_match_partial_credit() -> None:
    assert position_match(" 4321", "4321") == 1.0
    assert position_match("4391", "4321") == 0.75
    assert position_match("43210", "4321") == 0.8  # ran on: 4 of 5 positions
    assert position_match("43", "4321") == 0.5  # stopped early
    assert position_match("42", "142", from_right=True) == pytest.approx(2 / 3)


def test_model_source_equals_a_direct_reward_model_forward(tmp_path: Path) -> None:
    model, tokenizer = load_reward_model("tiny", seed=4)
    model.save_pretrained(tmp_path / "rm", tokenizer=tokenizer)
    source = build_reward_source([{"model": str(tmp_path / "rm"), "weight": -1.0}])
    prompts = ["how do I bake bread?", "hi"]
    completions = ["mix flour and water", "hello there, how are you"]
    scores = source(prompts, completions, [{}, {}])
    direct = []
    for p, c in zip(prompts, completions, strict=True):
        ids = tokenizer(p)["input_ids"] + tokenizer(c)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            direct.append(model(torch.tensor([ids])).rewards[0].item())
    assert scores.tolist() == pytest.approx([-d for d in direct], abs=1e-5)
    assert len(set(direct)) == 2
    # a run directory resolves to its newest checkpoint's model
    for step in (2, 10):
        checkpoint = tmp_path / "run" / "checkpoints" / f"step-{step}"
        (checkpoint / "model").mkdir(parents=True)
        (checkpoint / "trainer_state.pt").write_bytes(b"")
    model.save_pretrained(
        tmp_path / "run" / "checkpoints" / "step-10" / "model", tokenizer=tokenizer
    )
    from_run = build_reward_source([{"model": str(tmp_path / "run")}])
    assert from_run(prompts, completions, [{}, {}]).tolist() == pytest.approx(direct, abs=1e-5)


def test_user_file_import_error_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "broken.py"
    bad.write_text("import definitely_not_installed_xyz\n")
    with pytest.raises(ConfigError, match=r"importing .*broken\.py failed"):
        build_reward_source([{"function": f"{bad}:f"}])
    assert "alignkit_user_reward_broken" not in sys.modules
