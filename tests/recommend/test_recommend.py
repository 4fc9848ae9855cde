"""`alignkit recommend`: the choice moves as the documented rules say, JSON validates, configs run."""

from __future__ import annotations

import json
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
