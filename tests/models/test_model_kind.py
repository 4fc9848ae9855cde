"""A cost model is checked for being one before Safe-DPO trusts its sign.

``safety.cost_model`` accepts only a directory saved by ``RewardModel.save_pretrained`` with
``kind: cost``; the tiny preset, a policy checkpoint (random head) and a reward model (the
opposite sign) are refused with exit code 2 and a message saying what was given.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.errors import ModelError
from alignkit.models import load_policy, load_reward_model
from alignkit.models.reward import CONFIG_FILE, check_saved_kind

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def saved(tmp_path: Path, kind: str) -> Path:
    model, tokenizer = load_reward_model("tiny", kind=kind)
    return model.save_pretrained(tmp_path / kind, tokenizer)


def test_a_saved_cost_model_passes_and_records_its_kind(tmp_path):
    path = saved(tmp_path, "cost")
    assert json.loads((path / CONFIG_FILE).read_text())["kind"] == "cost"
    readme = (path / "README.md").read_text()
    assert "alignkit cost model (cost > 0 means unsafe)" in readme
    assert "alignkit.load_reward_model" in readme and "random head" in readme
    assert check_saved_kind(path, "cost", "safety.cost_model") == path


def test_a_reward_model_is_refused_as_a_cost_model(tmp_path):
    path = saved(tmp_path, "reward")
    with pytest.raises(ModelError, match=r"is a reward model \(alignkit_reward.json says kind"):
        check_saved_kind(path, "cost", "safety.cost_model")


def test_a_policy_checkpoint_is_refused_as_a_cost_model(tmp_path):
    policy, _ = load_policy("tiny")
    policy.save_pretrained(tmp_path / "policy")
    with pytest.raises(ModelError, match=r"a policy or plain model .* head would be random"):
        check_saved_kind(tmp_path / "policy", "cost", "safety.cost_model")


def test_tiny_and_a_missing_directory_are_refused(tmp_path):
    with pytest.raises(ModelError, match=r"safety\.cost_model=tiny is the built-in untrained"):
        check_saved_kind("tiny", "cost", "safety.cost_model")
    with pytest.raises(ModelError, match="is not an existing directory"):
        check_saved_kind(tmp_path / "nowhere", "cost", "safety.cost_model")


def test_a_model_saved_without_its_kind_is_refused_with_the_fix(tmp_path):
    path = saved(tmp_path, "cost")
    record = json.loads((path / CONFIG_FILE).read_text())
    del record["kind"]
    (path / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(ModelError, match='add "kind": "cost" to that file'):
        check_saved_kind(path, "cost", "safety.cost_model")


@pytest.mark.parametrize("given", ["tiny", "reward"])
def test_safe_dpo_with_a_wrong_cost_model_exits_2_saying_what_was_given(given, tmp_path, capsys):
    cost_model = "tiny" if given == "tiny" else str(saved(tmp_path, "reward"))
    args = [
        "train",
        "safe-dpo",
        "-c",
        str(EXAMPLES / "safe_dpo.yaml"),
        "safety.source=cost_model",
        f"safety.cost_model={cost_model}",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    expected = "untrained 'tiny' preset" if given == "tiny" else "is a reward model"
    assert f"safety.cost_model={cost_model}" in err and expected in err
    assert "Traceback" not in err
