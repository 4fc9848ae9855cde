"""eval policy: sampled ids kept, KL on them equals a per-sequence brute force, win rate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit.cli import main
from alignkit.data.synthetic import write_task
from alignkit.errors import ConfigError
from alignkit.eval.policy import evaluate_policy, judge, sample, sequence_kl, win_rate
from alignkit.models.loading import load_policy


@pytest.fixture(scope="module")
def task_prompts(tmp_path_factory: pytest.TempPathFactory) -> list:
    paths = write_task(tmp_path_factory.mktemp("task"), seed=0)
    lines = paths["prompts_heldout"].read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines[:4]]


PROMPTS = ["How do I bake bread?", "Tell me a joke", "What is the capital of France?", "Hi"]


@pytest.fixture(scope="module")
def models() -> tuple:
    policy, tokenizer = load_policy("tiny", seed=0)
    reference, _ = load_policy("tiny", seed=1)
    return policy, reference, tokenizer


def test_kl_on_sampled_tokens_matches_brute_force(models: tuple) -> None:
    policy, reference, tokenizer = models
    gens = sample(policy, tokenizer, PROMPTS, max_new_tokens=8, batch_size=3, seed=0)
    assert gens.input_ids.shape[0] == 4
    assert (gens.response_mask.sum(1) >= 1).all()
    kl = sequence_kl(policy, reference, gens, batch_size=2)
    for i in range(4):  # unpadded, one sequence at a time, full log-softmax
        keep = gens.attention_mask[i].bool()
        ids = gens.input_ids[i][keep][None]
        scored = gens.response_mask[i][keep]
        total = 0.0
        for model, sign in ((policy, 1.0), (reference, -1.0)):
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            token = logp.gather(1, ids[0, 1:, None])[:, 0]
            total += sign * token[scored[1:]].sum().item()
        assert kl[i].item() == pytest.approx(total, abs=1e-3)
    assert sequence_kl(policy, policy, gens).abs().max().item() < 1e-5


def test_win_rate_counts_ties_half_with_wilson_interval() -> None:
    result = win_rate(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 1.0, 1.0]))
    assert result["win_rate"] == pytest.approx(2.5 / 4)
    assert result["ci_low"] < 0.625 < result["ci_high"]


def test_synthetic_judge_refuses_foreign_prompts() -> None:
    with pytest.raises(ConfigError, match="judges the bundled task only"):
        judge("synthetic", ["Tell me a joke"], ["no"])


def test_report_and_cli(models: tuple, task_prompts: list, tmp_path: Path) -> None:
    policy, reference, tokenizer = models
    report = evaluate_policy(
        policy,
        tokenizer,
        task_prompts,
        ["synthetic"],
        reference=reference,
        versus=(reference, tokenizer),
        max_new_tokens=6,
        seed=1,
    )
    assert set(report["synthetic"]) == {"reward", "cost"}
    assert report["kl_k1"]["per_sequence"] is not None
    assert 0.0 <= report["win_rate"]["win_rate"] <= 1.0
    assert report["win_rate"]["judge"] == "synthetic:reward"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in task_prompts))
    with pytest.raises(SystemExit) as info:
        main(
            [
                "eval",
                "policy",
                "tiny",
                str(prompts),
                "--reference",
                "tiny",
                "--max-new-tokens",
                "4",
                "--out-dir",
                str(tmp_path / "out"),
            ]
        )
    assert info.value.code in (0, None)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["kl_k1"]["per_sequence"] == pytest.approx(0.0, abs=1e-5)  # tiny vs itself
    assert saved["prompts"] == 4
