"""`alignkit train` end to end, the example configs, bad input, and two processes.

Pins down: every example config loads against its method's config class and runs as written
(data and model swapped for tiny ones); `train dpo -c ... key=value` writes a run directory
that honours the overrides and `--resume` extends it; a bad data row, an unknown config key
and an unknown method each exit with code 2 and a message that says what and where, never a
traceback; DPO under `accelerate launch` with 2 processes x 4 pairs gives the loss curve of
1 process x 8 pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from launch_helpers import accelerate_launch

from alignkit.cli import main
from alignkit.config import load_config
from alignkit.data.synthetic import write_task, write_verifiable_tasks
from alignkit.tracking import read_metrics
from alignkit.trainers.dpo import DPOConfig
from alignkit.trainers.registry import get_method

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
#: Each example and the method that runs it.
EXAMPLE_METHODS = {
    "sft.yaml": "sft",
    "dpo.yaml": "dpo",
    "ipo.yaml": "dpo",
    "safe_dpo.yaml": "safe-dpo",
    "safe_dpo_linear.yaml": "safe-dpo",
    "rm.yaml": "rm",
    "cost.yaml": "cost",
    "sft_reverse.yaml": "sft",
    "sft_sort.yaml": "sft",
    "sft_add.yaml": "sft",
    "grpo.yaml": "grpo",
    "grpo_vllm.yaml": "grpo",
    "grpo_teacher.yaml": "grpo",
    "dapo.yaml": "grpo",
    "distill.yaml": "distill",
    "ppo.yaml": "ppo",
    "safe_ppo.yaml": "safe-ppo",
    "rloo.yaml": "rloo",
    "reinforce_pp.yaml": "reinforce++",
    "reinforce.yaml": "reinforce",
    "grpo_reasoning_gym.yaml": "grpo",
    "grpo_tool_calculator.yaml": "grpo",
}
#: Examples on SmolLM2 and reasoning-gym data: run on small data in
#: tests/trainers/test_multiturn_pg.py (a tiny model with SmolLM2's chat template).
SMOLLM2_EXAMPLES = {"grpo_reasoning_gym.yaml", "grpo_tool_calculator.yaml"}
#: Examples that need a vLLM server (make vllm-venv): loaded here, run by hand (their headers
#: give the measured run); the vLLM tier trains through the same settings.
SERVED_EXAMPLES = {"grpo_vllm.yaml"}
#: Examples of the online trainers: their length is counted in iterations.
ONLINE_EXAMPLES = {
    "grpo.yaml",
    "grpo_teacher.yaml",
    "dapo.yaml",
    "distill.yaml",
    "ppo.yaml",
    "safe_ppo.yaml",
    "rloo.yaml",
    "reinforce_pp.yaml",
    "reinforce.yaml",
}
QUIET = ("logging.progress_bar=false", "logging.plots=false")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic task, plus `small/<file>` with the first rows of each file."""
    folder = tmp_path_factory.mktemp("data")
    small = folder / "small"
    small.mkdir()
    for path in [*write_task(folder).values(), *write_verifiable_tasks(folder).values()]:
        rows = path.read_text(encoding="utf-8").splitlines(keepends=True)
        (small / path.name).write_text("".join(rows[:16]), encoding="utf-8")
    return folder


def train(args: list[str]) -> int:
    """Run `alignkit train ...` in this process; its exit code."""
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *args])
    code = exit_info.value.code
    return 0 if code is None else int(code)


def test_every_example_is_listed_and_loads_against_its_config_class():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(EXAMPLE_METHODS)
    for name, method_name in EXAMPLE_METHODS.items():
        method = get_method(method_name)
        config_class, _ = method.load()
        config = load_config(config_class, EXAMPLES / name, method.defaults)
        assert config.run_name == name.removesuffix(".yaml").replace("_", "-"), name
    safe = load_config(get_method("safe-dpo").load()[0], EXAMPLES / "safe_dpo.yaml")
    linear = load_config(get_method("safe-dpo").load()[0], EXAMPLES / "safe_dpo_linear.yaml")
    assert (safe.lambda_.rule, safe.lambda_.cost_estimator) == ("log", "policy")
    assert (linear.lambda_.rule, linear.lambda_.cost_estimator) == ("linear", "data")
    assert load_config(get_method("cost").load()[0], EXAMPLES / "cost.yaml", ("kind=cost",)).kind


@pytest.mark.parametrize(
    "example", sorted(set(EXAMPLE_METHODS) - SMOLLM2_EXAMPLES - SERVED_EXAMPLES)
)
def test_every_example_runs_as_written_on_small_data(example, data, tmp_path, monkeypatch):
    # Run from a directory holding data/ as README.md says, on 16-row files and the untrained
    # tiny model (the DPO-family examples name the SFT checkpoint, not trained here).
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "data").symlink_to(data / "small")
    monkeypatch.chdir(workdir)
    length = "train.iterations=2" if example in ONLINE_EXAMPLES else "max_steps=2"
    overrides = [length, "eval.every=null", *QUIET]
    settings = yaml.safe_load((EXAMPLES / example).read_text())
    if settings["model"]["name"] != "tiny":
        overrides.append("model.name=tiny")
    if settings.get("rollout", {}).get("teacher"):  # a warm-up checkpoint, not trained here
        overrides.append("rollout.teacher=tiny")
    if settings.get("distill", {}).get("teacher"):  # a trained policy, not trained here
        overrides.append("distill.teacher=tiny")
    code = train([EXAMPLE_METHODS[example], "-c", str(EXAMPLES / example), *overrides])
    assert code == 0
    run_dir = workdir / "runs" / settings["run_name"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 2
    assert (run_dir / "checkpoints" / "step-2" / "model").is_dir()


def test_train_dpo_with_overrides_runs_end_to_end_and_resumes(data, tmp_path, capsys):
    args = [
        "dpo",
        "-c",
        str(EXAMPLES / "dpo.yaml"),
        "model.name=tiny",
        f"data.train_file={data / 'small' / 'preference_train.jsonl'}",
        f"data.eval_file={data / 'small' / 'preference_heldout.jsonl'}",
        f"output_dir={tmp_path}",
        "run_name=cli-dpo",
        "max_steps=3",
        "examples_per_device=4",
        "dpo.kind=hinge",
        "dpo.beta=0.2",
        "logging.every=1",
        *QUIET,
    ]
    assert train(args) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "cli-dpo"
    assert f"run directory: {run_dir}" in out.replace("\n", "")  # rich wraps long paths
    result = json.loads(out.strip().splitlines()[-1])
    assert result["step"] == 3 and "eval/rewards/accuracies" in result["eval"]
    config = load_config(DPOConfig, run_dir / "config.yaml")
    assert (config.dpo.kind, config.dpo.beta, config.examples_per_device) == ("hinge", 0.2, 4)
    assert config.optim.lr == 1e-3  # from the file
    assert (run_dir / "reference_logps.pt").is_file()

    assert train([*args, "max_steps=5", "--resume", str(run_dir)]) == 0
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5]

    # Without -c, --resume takes the run's own config.yaml (the hinge loss, beta 0.2), from
    # the run directory or from one of its checkpoints.
    assert train(["dpo", "--resume", str(run_dir), "max_steps=6", *QUIET]) == 0
    assert train(["dpo", "--resume", str(run_dir / "checkpoints" / "step-6"), "max_steps=7"]) == 0
    resumed = load_config(DPOConfig, run_dir / "config.yaml")
    assert (resumed.dpo.kind, resumed.dpo.beta, resumed.max_steps) == ("hinge", 0.2, 7)
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, 8))
    assert train(["dpo", "--resume", str(tmp_path / "no-such-run")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_a_bad_data_row_exits_2_naming_file_row_and_field(data, tmp_path, capsys):
    good = (data / "small" / "preference_train.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in good[:6]]
    for row in rows:
        row.pop("margin")
    del rows[2]["rejected"]  # row 3
    rows[4]["chosen"] = 5  # row 5
    lines = [json.dumps(r) for r in rows]
    lines[5] = '{"prompt": "unfinished'  # row 6
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")

    code = train(["dpo", f"data.train_file={bad}", f"output_dir={tmp_path}", *QUIET])

    err = capsys.readouterr().err
    assert code == 2
    assert "3 invalid row(s)" in err
    assert f"{bad}:3: field 'rejected': missing" in err
    assert f"{bad}:5: field 'chosen'" in err
    assert f"{bad}:6: field '<row>'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_a_row_over_the_length_limit_with_policy_error_exits_2_naming_the_row(
    data, tmp_path, capsys
):
    args = [
        "sft",
        f"data.train_file={data / 'small' / 'sft_train.jsonl'}",
        "data.max_length=12",
        "data.length_policy=error",
        f"output_dir={tmp_path}",
        *QUIET,
    ]
    code = train(args)
    err = capsys.readouterr().err
    assert code == 2
    assert f"{data / 'small' / 'sft_train.jsonl'}:1:" in err and "max_length=12" in err
    assert "Traceback" not in err


def test_an_unknown_config_key_exits_2_with_the_nearest_spelling(tmp_path, capsys):
    assert train(["dpo", "-c", str(EXAMPLES / "dpo.yaml"), "optim.lrr=1e-4"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'optim.lrr'" in err and "did you mean 'optim.lr'" in err

    config = tmp_path / "typo.yaml"
    config.write_text("dpo:\n  kind: ipo\n  betta: 0.1\n")
    assert train(["dpo", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "did you mean 'dpo.beta'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("method", ["sft", "grpo"])
def test_lora_target_modules_all_linear_written_out_trains(method, data, tmp_path, monkeypatch):
    # The documented default written out, as examples/dpo.yaml suggests and PEFT users do: it
    # used to reach peft as ['all-linear'] ("Target modules {'all-linear'} not found").
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "data").symlink_to(data / "small")
    monkeypatch.chdir(workdir)
    example = {"sft": "sft.yaml", "grpo": "grpo.yaml"}[method]
    length = "train.iterations=1" if method == "grpo" else "max_steps=1"
    lora = "model.lora={r: 4, alpha: 8, target_modules: all-linear}"
    args = [method, "-c", str(EXAMPLES / example), "model.name=tiny", lora, length, *QUIET]
    assert train([*args, "eval.every=null", "run_name=lora", f"output_dir={tmp_path}"]) == 0
    adapter = tmp_path / "lora" / "checkpoints" / "step-1" / "model" / "adapter_config.json"
    targets = {
        name.rsplit(".", 1)[-1] for name in json.loads(adapter.read_text())["target_modules"]
    }
    # every linear projection of the tiny model, the output layer left out
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"} <= targets
    assert "lm_head" not in targets and "all-linear" not in targets


def test_an_unknown_method_exits_2_listing_the_valid_ones(capsys):
    assert train(["trpo", "-c", str(EXAMPLES / "dpo.yaml")]) == 2
    err = capsys.readouterr().err
    assert "unknown training method 'trpo'" in err
    assert (
        "sft, rm, cost, dpo, safe-dpo, rm-ensemble, ppo, grpo, rloo, reinforce++, reinforce" in err
    )


# --------------------------------------------------------------------------------------
# Two processes (DDP over gloo) under `accelerate launch -m alignkit`
# --------------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_two_processes_give_the_one_process_dpo_loss_curve(data, tmp_path):
    train_file = tmp_path / "pairs.jsonl"
    rows = (data / "preference_train.jsonl").read_text().splitlines(keepends=True)
    train_file.write_text("".join(rows[:64]))
    common = [
        "dpo",
        "model.name=tiny",
        f"data.train_file={train_file}",
        f"data.eval_file={data / 'small' / 'preference_heldout.jsonl'}",
        f"output_dir={tmp_path}",
        "data.max_length=128",
        "optim.lr=1e-3",
        "logging.every=1",
        *QUIET,
    ]
    two = accelerate_launch(
        "-m", "alignkit", "train", *common, "run_name=two", "examples_per_device=4", root=tmp_path
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert train([*common, "run_name=one", "examples_per_device=8"]) == 0

    two_records = read_metrics(tmp_path / "two" / "metrics.jsonl")
    one_records = read_metrics(tmp_path / "one" / "metrics.jsonl")
    # 64 pairs, 2 processes x 4 = 1 process x 8 = 8 pairs per step: 8 steps either way.
    assert [r["step"] for r in two_records] == [r["step"] for r in one_records] == list(range(1, 9))
    two_curve = [r["loss"] for r in two_records]
    one_curve = [r["loss"] for r in one_records]
    # Measured: 0.693 -> 0.297 in both, step by step within 4e-7 relative (the batches of 4
    # are padded shorter than those of 8, so sums differ in the last bits).
    assert two_curve[0] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at step 1
    assert two_curve[-1] < 0.6 * two_curve[0] and one_curve[-1] < 0.6 * one_curve[0]
    assert two_curve == pytest.approx(one_curve, rel=1e-4)
    assert two_records[-1]["eval/rewards/margins"] == pytest.approx(
        one_records[-1]["eval/rewards/margins"], rel=1e-4
    )
