"""The top-level API: every exported name resolves, lazily (``import alignkit`` stays light)."""

from __future__ import annotations

import subprocess
import sys

import alignkit


def test_every_exported_name_resolves():
    for name in alignkit.__all__:
        assert getattr(alignkit, name) is not None, name
    assert alignkit.train_dpo.__module__ == "alignkit.trainers.dpo"
    assert alignkit.RewardScorer.__name__ == "ModelReward"


def test_importing_alignkit_does_not_import_torch():
    code = "import sys, alignkit; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_documented_python_use_runs(tmp_path, head_of, run_settings):
    cfg = alignkit.load_config(
        alignkit.SFTConfig,
        None,
        run_settings(tmp_path, "api", f"data.train_file={head_of('sft_train', 8)}", "max_steps=2"),
    )
    summary = alignkit.train_sft(cfg)
    model, tokenizer = alignkit.load_policy(summary["last_checkpoint"] + "/model")
    settings = alignkit.GenerationSettings(max_new_tokens=4)
    answers = alignkit.generate_responses(model, tokenizer, ["How do I bake bread?"], settings)
    assert len(answers) == 1 and isinstance(answers[0], str)
