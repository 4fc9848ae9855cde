"""`alignkit recommend`: the choice moves as the documented rules say, JSON validates, configs run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import pytest

from alignkit.cli import main
from alignkit.data.synthetic import write_task, write_verifiable_tasks
from alignkit.recommend import (
    RECOMMENDATION_SCHEMA,
    Features,
    Requirements,
    Resources,
    measure_data,
    recommend,
    score_methods,
)
from alignkit.recommend import scoring as recommend_module
from alignkit.recommend.budget import TokenCosts, iteration_cost, max_new_tokens_for, model_costs
from alignkit.recommend.features import DataFeatures, ModelFeatures, detect_format
from alignkit.recommend.rules import METHODS, RULES, memory_need_gb
from alignkit.recommend.scoring import suggest_hyperparameters


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("task")
    write_task(out / "data", seed=0)
    write_verifiable_tasks(out / "data", seed=0)
    return out / "data"


@pytest.fixture
def every_method_available(monkeypatch: pytest.MonkeyPatch) -> None:
    """Judge the rules alone: pretend every method's trainer is registered."""
    monkeypatch.setattr(recommend_module, "_available", lambda cli: True)


def _features(
    data: DataFeatures | None = None,
    parameters: int = 125_000_000,
    gpus: int = 8,
    gpu_memory_gb: float = 80.0,
    hours: float = 48.0,
    **requirements: object,
) -> Features:
    return Features(
        data,
        ModelFeatures("m", parameters, "llama", True),
        Resources(gpus, gpu_memory_gb, hours, False),
        Requirements(**requirements),  # type: ignore[arg-type]
    )


def _pairs(rows: int = 20_000, fmt: str = "preference", ties: float = 0.0) -> DataFeatures:
    return DataFeatures("pairs.jsonl", fmt, rows, rows, 1.0, 40.0, None, ties, None, False)


def _prompts(answers: bool) -> DataFeatures:
    return DataFeatures("prompts.jsonl", "prompt", 5000, 5000, 1.0, 0.0, None, None, None, answers)


def test_preference_file_without_a_reward_source_picks_the_dpo_family(
    every_method_available: None,
) -> None:
    rec = recommend(_features(_pairs()))
    assert rec.method == "dpo"
    assert rec.runner_up == "ipo"
    online = {s.method: s for s in rec.scores if METHODS[s.method].online}
    assert all(s.score < rec.scores[0].score for s in online.values())


def test_a_verifiable_reward_function_picks_grpo(every_method_available: None) -> None:
    rec = recommend(_features(_prompts(answers=True), online_reward="tasks:exact_match"))
    assert rec.method == "grpo"
    assert rec.runner_up == "rloo"
    assert rec.hyperparameters["rollout.samples_per_prompt"] == 8


def test_prompts_without_any_reward_source_block_every_method(
    every_method_available: None,
) -> None:
    rec = recommend(_features(_prompts(answers=False)))
    assert rec.method is None
    assert all(not s.feasible for s in rec.scores)


@pytest.mark.parametrize(
    ("data", "requirements", "expected"),
    [
        (_pairs(fmt="safety"), {}, "safe-dpo"),
        (
            _pairs(fmt="preference"),
            {"reward_model": "runs/rm", "cost_model": "runs/cost"},
            "safe-ppo",
        ),
    ],
)
def test_a_safety_requirement_picks_a_constrained_method(
    every_method_available: None, data: DataFeatures, requirements: dict, expected: str
) -> None:
    rec = recommend(_features(data, safety=True, **requirements))
    assert rec.method == expected


def test_safety_without_a_safe_method_that_can_run_falls_back_with_a_penalty(
    every_method_available: None,
) -> None:
    rec = recommend(_features(_pairs(fmt="preference"), safety=True))
    by_method = {s.method: s for s in rec.scores}
    assert not by_method["safe-dpo"].feasible and not by_method["safe-ppo"].feasible
    assert by_method["dpo"].score == pytest.approx(3.0 - 3.0)


def test_little_gpu_memory_rules_out_the_critic(every_method_available: None) -> None:
    roomy = recommend(
        _features(
            _prompts(True), parameters=10**9, gpus=8, online_reward="f:g", reward_model="runs/rm"
        )
    )
    assert {s.method for s in roomy.scores if s.feasible} >= {"ppo", "grpo"}
    small = recommend(
        _features(
            _prompts(True),
            parameters=10**9,
            gpus=1,
            gpu_memory_gb=8,
            online_reward="f:g",
            reward_model="runs/rm",
        )
    )
    by_method = {s.method: s for s in small.scores}
    assert not by_method["ppo"].feasible
    assert "GB" in by_method["ppo"].blockers[0]
    assert by_method["grpo"].feasible and by_method["grpo"].lora  # policy + ref + RM as LoRA
    assert small.method == "grpo"
    assert small.hyperparameters["model.lora"] == {"r": 16, "alpha": 32}


def test_memory_model_counts_sixteen_bytes_per_trained_and_two_per_frozen_parameter() -> None:
    gib = 2**30
    assert memory_need_gb(METHODS["dpo"], gib) == pytest.approx(16)
    assert memory_need_gb(METHODS["ppo"], gib) == pytest.approx(2 * 16 + 2 * 2)
    assert memory_need_gb(METHODS["safe-ppo"], gib) == pytest.approx(3 * 16 + 3 * 2)


def test_noisy_small_pair_sets_prefer_ipo_and_suggest_label_smoothing_for_dpo(
    every_method_available: None,
) -> None:
    clean = recommend(_features(_pairs(rows=800)))
    assert clean.method == "ipo"  # small: +1.0 IPO, -0.5 DPO
    assert recommend(_features(_pairs(rows=20_000))).method == "dpo"
    noisy = _features(_pairs(rows=20_000, ties=0.3))
    assert recommend(noisy).method == "ipo"  # ties: +1.0 IPO, -0.5 DPO
    assert suggest_hyperparameters(METHODS["dpo"], noisy, lora=False)["dpo.label_smoothing"] == 0.1
    assert "dpo.label_smoothing" not in suggest_hyperparameters(
        METHODS["dpo"], _features(_pairs()), lora=False
    )


def test_stability_and_simplicity_push_away_from_ppo(every_method_available: None) -> None:
    base = {s.method: s.score for s in score_methods(_features(reward_model="runs/rm"))}
    steady = {
        s.method: s.score
        for s in score_methods(_features(reward_model="runs/rm", stability=True, simplicity=True))
    }
    assert steady["ppo"] == pytest.approx(base["ppo"] - 3.0)
    assert steady["ipo"] == pytest.approx(base["ipo"] + 2.5)


def test_methods_not_in_this_version_are_blocked_not_recommended() -> None:
    from alignkit.trainers.registry import METHODS as TRAINERS

    rec = recommend(
        _features(
            _prompts(True), online_reward="f:g", reward_model="runs/rm", cost_model="runs/cost"
        )
    )
    for score in rec.scores:
        if METHODS[score.method].cli not in TRAINERS:
            assert not score.feasible
            assert "not in this version" in score.blockers[0]
    assert rec.method is None or METHODS[rec.method].cli in TRAINERS


def test_every_rule_names_known_methods_and_cites_evidence() -> None:
    for rule in RULES:
        assert set(rule.effects) <= set(METHODS), rule.id
        assert rule.reason and rule.evidence, rule.id
    assert len({rule.id for rule in RULES}) == len(RULES)


def test_data_features_of_the_bundled_files(task_dir: Path) -> None:
    pairs = measure_data(task_dir / "preference_train.jsonl")
    assert pairs.format == "preference"
    lines = (task_dir / "preference_train.jsonl").read_text().count("\n")
    assert pairs.rows == lines and pairs.tie_share == 0.0
    assert 0 < pairs.prompt_diversity <= 1
    assert measure_data(task_dir / "safety_train.jsonl").format == "safety"
    assert measure_data(task_dir / "ratings_train.jsonl").format == "rating"
    assert measure_data(task_dir / "prompts_train.jsonl").format == "prompt"
    assert detect_format({"messages": []}) == "sft"
    with pytest.raises(ValueError, match="no known format"):
        detect_format({"foo": 1})


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return int(exit_info.value.code or 0), capsys.readouterr().out


def test_json_validates_and_is_deterministic(
    task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "recommend",
        "--data",
        str(task_dir / "preference_train.jsonl"),
        "--model",
        "tiny",
        "--gpus",
        "0",
        "--gpu-memory",
        "16",
        "--hours",
        "2",
        "--json",
        "--out",
        str(tmp_path / "rec.yaml"),
    ]
    code, first = _run(args, capsys)
    assert code == 0
    report = json.loads(first)
    jsonschema.validate(report, RECOMMENDATION_SCHEMA)
    assert report["recommendation"] in ("dpo", "ipo")
    assert report["features"]["model"]["parameters"] == 166_208
    _, second = _run(args, capsys)
    assert json.loads(second)["scores"] == report["scores"]


def test_without_data_it_answers_and_says_what_it_assumed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out = _run(["recommend", "--json", "--need", "safety"], capsys)
    assert code == 0
    report = json.loads(out)
    jsonschema.validate(report, RECOMMENDATION_SCHEMA)
    assert any("no --data" in a for a in report["assumptions"])
    assert any("no --model" in a for a in report["assumptions"])
    assert report["config_path"] is None


def test_unknown_requirement_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["recommend", "--need", "speed"])
    assert exit_info.value.code == 2
    assert "'speed'" in capsys.readouterr().err


def test_the_written_config_runs(
    task_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "rec.yaml"
    code, out = _run(
        [
            "recommend",
            "--data",
            str(task_dir / "preference_train.jsonl"),
            "--model",
            "tiny",
            "--gpus",
            "0",
            "--gpu-memory",
            "16",
            "--json",
            "--out",
            str(config),
        ],
        capsys,
    )
    assert code == 0
    report = json.loads(out)
    assert report["command"] == f"alignkit train dpo -c {config}"
    method = report["command"].split()[2]
    code, out = _run(
        [
            "train",
            method,
            "-c",
            str(config),
            "max_steps=2",
            "logging.progress_bar=false",
            "logging.plots=false",
        ],
        capsys,
    )
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["step"] == 2


def test_the_docs_show_the_rule_table_of_the_code() -> None:
    from alignkit.recommend.report import rules_markdown

    doc = Path(__file__).parents[2] / "docs" / "recommender.md"
    assert rules_markdown() in doc.read_text(encoding="utf-8")


def test_a_verifiable_task_gets_a_grpo_config_that_runs(
    task_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "grpo.yaml"
    code, out = _run(
        [
            "recommend",
            "--data",
            str(task_dir / "sort_prompts.jsonl"),
            "--online-reward",
            "sort_match",
            "--model",
            "tiny",
            "--gpus",
            "0",
            "--gpu-memory",
            "16",
            "--json",
            "--out",
            str(config),
        ],
        capsys,
    )
    assert code == 0
    report = json.loads(out)
    assert report["recommendation"] == "grpo"
    assert report["hyperparameters"]["rewards"] == [{"function": "sort_match", "weight": 1.0}]
    code, out = _run(
        [
            "train",
            "grpo",
            "-c",
            str(config),
            "train.iterations=2",
            "logging.progress_bar=false",
            "logging.plots=false",
        ],
        capsys,
    )
    assert code == 0
    assert json.loads(out.strip().splitlines()[-1])["step"] == 2


# --------------------------------------------------------------------------------------
# The online budget: settings that fit the stated hours, answers that fit max_new_tokens
# --------------------------------------------------------------------------------------

#: The newcomer trial's measurement (SmolLM2-135M, CPU, one thread): 8 prompts x 4 samples,
#: 64 new tokens, ~40 prompt tokens, ~30 answered: rollout 14.4 s, update 12.4 s.
TRIAL_COSTS = TokenCosts(
    decode_step_8=14.4 / 64,
    forward_token=12.4 / (32 * 70) / 3,
    update_token=12.4 / (32 * 70),
    source="the trial's measurement",
    completion_tokens=(9, 11, 12, 14, 15, 18, 22, 30),
    cap=64,
)


def _verifiable_prompts(prompt_tokens: float = 40.0, answer_tokens: float = 2.0) -> DataFeatures:
    return DataFeatures(
        "chain.jsonl", "prompt", 256, 256, 1.0, 0.0, None, None, None, True,
        prompt_tokens_mean=prompt_tokens, answer_tokens_p95=answer_tokens,
    )  # fmt: skip


def test_one_hour_on_a_cpu_gets_settings_that_fit_the_hour(every_method_available) -> None:
    features = _features(
        _verifiable_prompts(), parameters=134_515_008, gpus=0, gpu_memory_gb=24, hours=1.0,
        online_reward="my_reward.py:chain_sum_reward",
    )  # fmt: skip
    rec = recommend(features, TRIAL_COSTS)
    hp, budget = rec.hyperparameters, rec.budget
    assert rec.method == "grpo" and budget is not None
    cost = iteration_cost(
        TRIAL_COSTS,
        hp["rollout.prompts_per_iteration"],
        hp["rollout.samples_per_prompt"],
        40.0,
        hp["rollout.max_new_tokens"],
    )
    assert hp["train.iterations"] * cost.total_s <= 3600
    assert budget["hours"] <= 1.0 and budget["iterations"] == hp["train.iterations"] >= 20
    # what it proposed before: 64 prompts x 8 samples, 16 new tokens, the default 100
    # iterations; at these costs that is 5.6 h (the trial measured 161-174 s per iteration)
    before = iteration_cost(TRIAL_COSTS, 64, 8, 40.0, 16)
    assert 100 * before.total_s > 5 * 3600
    # answers sized from the model's own sampled answers (p90: 30 tokens), not the default 16
    assert hp["rollout.max_new_tokens"] >= 1.25 * 30


def test_a_budget_too_short_for_any_batch_says_so(every_method_available) -> None:
    features = _features(
        _verifiable_prompts(), parameters=134_515_008, gpus=0, gpu_memory_gb=24, hours=0.01,
        online_reward="f.py:g",
    )  # fmt: skip
    rec = recommend(features, TRIAL_COSTS)
    assert rec.budget["too_short"]
    assert rec.hyperparameters["rollout.prompts_per_iteration"] == 4
    assert any("fit only" in note for note in rec.notes)


def test_max_new_tokens_follows_the_answer_lengths() -> None:
    short, _ = max_new_tokens_for(2.0)
    long, _ = max_new_tokens_for(120.0)
    assert short == 16 and long == 8 * math.ceil((2 * 120 + 8) / 8)
    # the model's own answers, when measured, are longer than the bare reference answers
    measured, note = max_new_tokens_for(2.0, (10, 20, 30, 40, 50, 60, 70, 80), cap=128)
    assert measured == 8 * math.ceil(1.25 * 80 / 8) and note is None
    # a model that does not stop: the data decide, and the report says why
    capped, note = max_new_tokens_for(2.0, (64,) * 6 + (10, 12), cap=64)
    assert capped == 16 and "did not end 6 of 8" in note


def test_modelled_costs_scale_with_the_model_and_the_machine() -> None:
    small = model_costs(10**8, lora=False, gpus=0, flops_per_s=100e9, bandwidth=10e9)
    large = model_costs(10**9, lora=False, gpus=0, flops_per_s=100e9, bandwidth=10e9)
    lora = model_costs(10**9, lora=True, gpus=0, flops_per_s=100e9, bandwidth=10e9)
    assert large.update_token == pytest.approx(10 * small.update_token)
    assert lora.update_token == pytest.approx(large.update_token * 4 / 6)
    gpu = model_costs(10**9, lora=False, gpus=8, flops_per_s=None, bandwidth=None)
    assert gpu.update_token < large.update_token / 100


def test_lengths_are_counted_in_the_models_tokens(task_dir: Path) -> None:
    from alignkit.data.tokenize import tokenize_prompts
    from alignkit.models import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    path = task_dir / "sort_prompts.jsonl"
    features = measure_data(path, tokenizer)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    prompts = tokenize_prompts([{"prompt": r["prompt"]} for r in rows], tokenizer)
    expected = sum(len(e["input_ids"]) for e in prompts) / len(rows)
    assert features.prompt_tokens_mean == pytest.approx(expected)
    answers = sorted(
        len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in rows
    )
    assert features.answer_tokens_p95 == answers[int(0.95 * len(answers))]
    assert measure_data(path).length_unit.startswith("estimated")


def test_a_short_budget_on_this_machine_is_sized_from_measured_iterations(
    task_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out = _run(
        [
            "recommend",
            "--data",
            str(task_dir / "sort_prompts.jsonl"),
            "--online-reward",
            "sort_match",
            "--model",
            "tiny",
            "--hours",
            "0.05",
            "--json",
            "--out",
            str(tmp_path / "grpo.yaml"),
        ],
        capsys,
    )
    assert code == 0
    report = json.loads(out)
    jsonschema.validate(report, RECOMMENDATION_SCHEMA)
    budget, hp = report["budget"], report["hyperparameters"]
    assert budget["costs"].startswith("measured on this machine")
    assert budget["iterations"] * budget["seconds_per_iteration"] <= 0.05 * 3600
    assert hp["train.iterations"] == budget["iterations"]
    assert hp["rollout.max_new_tokens"] == budget["max_new_tokens"] >= 16
