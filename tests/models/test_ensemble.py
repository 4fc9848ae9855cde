"""Reward-model ensembles: training in one run, combinations, uncertainty, active selection."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from ensemble_helpers import train_tiny_ensemble

from alignkit.cli import main
from alignkit.data.select import select_uncertain
from alignkit.models.ensemble import fit_stacking, load_reward_source
from alignkit.ops.stats import pairwise_accuracy


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ensemble")
    return train_tiny_ensemble(root, max_steps=20, eval_every=10), root / "data"


def _heldout(data: Path, n: int = 64) -> list[dict]:
    lines = (data / "preference_heldout.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def test_one_run_dir_with_a_best_checkpoint_per_member(trained: tuple[Path, Path]) -> None:
    run, _ = trained
    spec = json.loads((run / "ensemble.json").read_text())
    assert [m["name"] for m in spec["members"]] == ["member-0", "member-1", "member-2"]
    for member in spec["members"]:
        assert (run / member["checkpoint"] / "alignkit_reward.json").is_file()
        assert member["best_step"] in (10, 20)
        assert member["validation_accuracy"] >= 0.9
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["eval/accuracy_mean"] >= 0.9
    assert not (run / "data").exists()  # resampled files removed unless keep_data


def test_median_ignores_a_corrupted_member(trained: tuple[Path, Path]) -> None:
    run, data = trained
    rows = _heldout(data)
    ensemble = load_reward_source(run)
    with torch.no_grad():
        ensemble.models[0].head.weight.mul_(-100.0)  # one member turned upside down, loudly
    prompts = [r["prompt"] for r in rows]
    chosen = ensemble.member_scores(prompts, [r["chosen"] for r in rows])
    rejected = ensemble.member_scores(prompts, [r["rejected"] for r in rows])
    accuracy = {}
    for method in ("mean", "median"):
        ensemble.combination = method
        accuracy[method] = float(
            pairwise_accuracy(ensemble.combine(chosen), ensemble.combine(rejected))
        )
    assert accuracy["median"] >= 0.9
    assert accuracy["mean"] <= 0.2


def test_std_is_higher_out_of_distribution(trained: tuple[Path, Path]) -> None:
    run, data = trained
    rows = _heldout(data)
    ensemble = load_reward_source(run)
    prompts = [r["prompt"] for r in rows]
    inside = ensemble.member_scores(
        prompts * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    )
    rng = random.Random(0)
    words = ["zorp", "quix", "blarg", "flum", "tesk", "vreen", "ogg", "plim", "snar", "dwex"]
    outside = ensemble.member_scores(prompts, [" ".join(rng.sample(words, 5)) for _ in rows])
    std_in = inside.std(0, correction=0).mean().item()
    std_out = outside.std(0, correction=0).mean().item()
    assert std_out > 1.3 * std_in


def test_penalised_score_is_mean_minus_k_std(trained: tuple[Path, Path]) -> None:
    run, data = trained
    rows = _heldout(data, 8)
    ensemble = load_reward_source(run, penalty=2.0)
    prompts, responses = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    score, members = ensemble.score_with_members(prompts, responses)
    expected = members.mean(0) - 2.0 * members.std(0, correction=0)
    assert torch.allclose(score, expected, atol=1e-5)
    # one batched pass per input: the same scores in batches of 3 as in one batch
    ensemble.batch_size = 3
    assert torch.allclose(ensemble.member_scores(prompts, responses), members, atol=1e-4)


class _PlantedScorer:
    """Three members; they agree on every pair except the planted ones."""

    def __init__(self, disagree: set[str]) -> None:
        self.disagree = disagree

    def member_scores(self, prompts: list, responses: list[str]) -> torch.Tensor:
        out = torch.zeros(3, len(responses))
        for i, text in enumerate(responses):
            base = 1.0 if text.startswith("good") else -1.0
            spread = torch.tensor([3.0, -3.0, 0.0]) if text in self.disagree else torch.zeros(3)
            out[:, i] = base + spread
        return out


def test_select_picks_the_pairs_members_disagree_on() -> None:
    candidates = [
        (
            {"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"},
            {"prompt": f"p{i}", "a": f"good {i}", "b": f"bad {i}"},
        )
        for i in range(8)
    ]
    scorer = _PlantedScorer({"good 2", "good 5"})
    for measure in ("std", "variance_ratio"):
        picked = select_uncertain(scorer, candidates, 2, measure)
        assert sorted(r["prompt"] for r in picked) == ["p2", "p5"]
        assert all(r["uncertainty"] > 0 for r in picked)


def test_select_cli_on_a_trained_ensemble(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = trained
    src = tmp_path / "candidates.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _heldout(data, 10)))
    out = tmp_path / "to_label.jsonl"
    with pytest.raises(SystemExit) as info:
        main(
            [
                "data",
                "select",
                str(src),
                str(out),
                "--by",
                "uncertainty",
                "--ensemble",
                str(run),
                "--budget",
                "3",
            ]
        )
    assert info.value.code == 0
    picked = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(picked) == 3
    values = [r["uncertainty"] for r in picked]
    assert values == sorted(values, reverse=True)


def test_stacking_weights_favour_the_informative_member() -> None:
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(400, generator=g).abs() + 0.1  # every pair: chosen better
    margins = torch.stack([truth * 2, torch.randn(400, generator=g) * 2])
    w = fit_stacking(margins)
    assert w[0] > 0.5 and abs(w[1]) < 0.5 * w[0]


@pytest.mark.parametrize("which", ["ensemble", "single"])
def test_eval_rm_cli_writes_report_and_plots(
    trained: tuple[Path, Path], tmp_path: Path, which: str
) -> None:
    run, data = trained
    model = run if which == "ensemble" else run / "member-1"
    ratings = tmp_path / "ratings.jsonl"
    lines = (data / "ratings_heldout.jsonl").read_text().splitlines()[:30]
    ratings.write_text("\n".join(lines) + "\n")
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as info:
        main(["eval", "rm", str(model), str(ratings), "--out-dir", str(out)])
    assert info.value.code in (0, None)
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"] >= 0.9
    assert report["kendall_tau"]["groups"] >= 5 and report["kendall_tau"]["mean"] >= 0.5
    assert set(report["robustness"]) == {"whitespace", "casing", "appended_text", "response_order"}
    assert (out / "reliability.png").is_file() and (out / "margins.png").is_file()
    assert ("members" in report) == (which == "ensemble")


def test_ensemble_is_a_rollout_reward_source(trained: tuple[Path, Path]) -> None:
    from alignkit.rollout.rewards import build_reward_source

    run, data = trained
    rows = _heldout(data, 6)
    prompts, responses = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    source = build_reward_source([{"model": str(run), "penalty": 1.0, "combination": "median"}])
    expected = load_reward_source(run, combination="median", penalty=1.0).score(prompts, responses)
    got = source(prompts, responses, [{} for _ in rows])
    assert torch.allclose(got, expected, atol=1e-5)
