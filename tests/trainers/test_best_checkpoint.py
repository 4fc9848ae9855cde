"""Early stopping keeps the best evaluation's checkpoint (whatever keep_last says) and says
where it is."""

from __future__ import annotations

from pathlib import Path

from alignkit.config import load_config
from alignkit.tracking import list_checkpoints
from alignkit.trainers.sft import SFTConfig, SFTTrainer, build_sft_trainer


def test_the_best_checkpoint_is_kept_and_named(head_of, run_settings, tmp_path, capsys):
    class Scripted(SFTTrainer):
        # eval/accuracy per evaluation: best at the 2nd (step 2), then worse.
        scores = iter([0.5, 0.9, 0.7, 0.6, 0.8])

        def evaluate(self):
            return {"eval/accuracy": next(self.scores)}

    cfg = load_config(
        SFTConfig,
        None,
        run_settings(
            tmp_path,
            "best",
            "model.name=tiny",
            f"data.train_file={head_of('sft_train', 8)}",
            f"data.eval_file={head_of('sft_heldout', 4)}",
            "examples_per_device=4",
            "max_steps=5",
            "eval.every=1",
            "eval.early_stopping.metric=eval/accuracy",
            "eval.early_stopping.patience=10",
            "checkpoint.every=1",
            "checkpoint.keep_last=1",
        ),
    )
    trainer = build_sft_trainer(cfg)
    trainer.__class__ = Scripted
    summary = trainer.train()
    best = summary["best"]
    assert (best["value"], best["step"]) == (0.9, 2)  # accuracy: higher is better by default
    assert best["checkpoint"] == str(cfg.run_dir / "checkpoints" / "step-2")
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step-2", "step-5"]
    assert (Path(best["checkpoint"]) / "model" / "config.json").is_file()
    assert f"best eval/accuracy 0.9 at step 2: {best['checkpoint']}" in capsys.readouterr().out
