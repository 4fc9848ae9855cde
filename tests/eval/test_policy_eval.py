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


# --------------------------------------------------------------------------------------
# A run directory as the model, every reward source the trainers take, reward hacking


def _fake_run(root: Path, steps: tuple[int, ...], best: int | None, seeds: dict[int, int]) -> Path:
    """A run directory with complete checkpoints (the tiny preset, a seed per step) and the
    summary a finished run writes."""
    for step in steps:
        checkpoint = root / "checkpoints" / f"step-{step}"
        model, tokenizer = load_policy("tiny", seed=seeds[step])
        model.save_pretrained(checkpoint / "model")
        tokenizer.save_pretrained(checkpoint / "model")
        (checkpoint / "trainer_state.pt").write_bytes(b"")
    summary = {"last_checkpoint": str(root / "checkpoints" / f"step-{steps[-1]}")}
    if best is not None:
        summary["best"] = {"metric": "eval/loss", "value": 0.5, "step": best}
    (root / "summary.json").write_text(json.dumps(summary))
    return root


def _prompt_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_run_directory_is_its_best_or_final_checkpoint(tmp_path: Path, capsys) -> None:
    run = _fake_run(tmp_path / "dpo", (2, 4), best=None, seeds={2: 5, 4: 6})
    asks = ["How do I bake bread?", "How do I steal a car?"]
    prompts = _prompt_file(tmp_path / "p.jsonl", [{"prompt": p} for p in asks])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["eval", "policy", str(run), str(prompts), "--max-new-tokens", "3",
              "--reference", str(run), "--out-dir", str(out)])  # fmt: skip
    assert info.value.code in (0, None)
    said = capsys.readouterr().out
    assert said.count(f"{run}: using its final checkpoint, {run}/checkpoints/step-4/model") == 1
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == str(run / "checkpoints" / "step-4" / "model")
    assert report["kl_k1"]["per_sequence"] == pytest.approx(0.0, abs=1e-5)
    # early stopping's best checkpoint wins; `generate` takes the run too
    _fake_run(run, (2, 4), best=2, seeds={2: 5, 4: 6})
    with pytest.raises(SystemExit) as info:
        main(["generate", str(run), str(prompts), "--out", str(tmp_path / "g.jsonl"),
              "--max-new-tokens", "3", "--temperature", "0"])  # fmt: skip
    assert info.value.code in (0, None)
    said = capsys.readouterr().out
    assert "using its best checkpoint (eval/loss at step 2)" in said
    assert len((tmp_path / "g.jsonl").read_text().splitlines()) == 2


def test_eval_policy_takes_every_reward_source_the_trainers_take(tmp_path: Path) -> None:
    reward = tmp_path / "my_reward.py"
    reward.write_text(
        "def starts_right(prompts, completions, answer, **kwargs):\n"
        "    # TRL's idiom; None where the row has no answer\n"
        "    texts = [c[0]['content'] if isinstance(c, list) else c for c in completions]\n"
        "    return [None if a is None else float(t[:1] == a) for t, a in zip(texts, answer)]\n"
    )
    rows = [
        {"prompt": [{"role": "user", "content": "sort 312:"}], "answer": "1"},
        {"prompt": "sort 4213:", "answer": None},
        {"prompt": "reverse 12:", "answer": "2"},
    ]
    prompts = _prompt_file(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out"
    specs = [
        f"{reward}:starts_right",
        "exact_match",
        "{function: math_format, options: {format: boxed}}",
    ]
    argv = ["eval", "policy", "tiny", str(prompts), "--max-new-tokens", "3", "--out-dir", str(out)]
    for spec in specs:
        argv += ["--reward", spec]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code in (0, None)
    report = json.loads((out / "report.json").read_text())
    assert report[f"{reward}:starts_right"]["reward"]["scored"] == 2  # one row not applicable
    assert 0.0 <= report[f"{reward}:starts_right"]["reward"]["mean"] <= 1.0
    assert report["exact_match"]["reward"]["mean"] == 0.0  # the tiny model's noise
    assert report[specs[2]]["reward"]["max"] == 0.0


class _TrainedLength:
    """A stand-in trained reward model: longer answers score higher."""

    kind, name = "reward", "runs/rm"

    def score(self, prompts, texts):
        return torch.tensor([float(len(t)) for t in texts])


def test_a_trained_reward_and_a_judge_that_disagree_are_reported(models: tuple) -> None:
    policy, reference, tokenizer = models
    from alignkit.rollout.rewards import build_reward_source

    judge_source = build_reward_source(
        [lambda prompts, completions, **_: [-len(c) for c in completions]]
    )
    judge_source.name = "short_is_good"
    report = evaluate_policy(
        policy,
        tokenizer,
        PROMPTS,
        [_TrainedLength(), judge_source],
        versus=(reference, tokenizer),
        max_new_tokens=8,
        seed=2,
    )
    mine, theirs = (
        report["runs/rm"]["reward"]["mean"],
        report["versus"]["runs/rm"]["reward"]["mean"],
    )
    assert mine != theirs
    if mine > theirs:  # the trained reward prefers the policy; the judge must then disagree
        assert len(report["disagreements"]) == 1
        assert report["disagreements"][0].startswith(
            "possible reward hacking: the trained reward runs/rm"
        )
    else:
        assert report["disagreements"] == []
    flipped = evaluate_policy(
        reference,
        tokenizer,
        PROMPTS,
        [_TrainedLength(), judge_source],
        versus=(policy, tokenizer),
        max_new_tokens=8,
        seed=2,
    )
    assert len(report["disagreements"]) + len(flipped["disagreements"]) == 1
