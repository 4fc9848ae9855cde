"""Config loading: YAML + dotted overrides, typed coercion, errors that name key, file and fix."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from alignkit.config import (
    VERSIONS_KEY,
    OptimConfig,
    TrainConfig,
    config_to_dict,
    load_config,
    save_resolved_config,
)
from alignkit.config import inputs as inputs_module
from alignkit.config import schema as config_module
from alignkit.errors import ConfigError


@dataclass
class LambdaConfig:
    rule: Literal["log", "linear"] = field(default="log", metadata={"help": "Update rule."})
    init: float = field(default=1.0, metadata={"help": "Initial value."})


@dataclass
class MethodConfig(TrainConfig):
    """A method config the way trainers write them: inherits the loop's, adds sub-configs."""

    beta: float = field(default=0.1, metadata={"help": "DPO temperature."})
    lambda_: LambdaConfig = field(default_factory=LambdaConfig, metadata={"help": "Multiplier."})
    lora: LambdaConfig | None = field(default=None, metadata={"help": "Optional block."})
    tags: dict[str, int] = field(default_factory=dict, metadata={"help": "Free-form counts."})


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_and_overrides_fill_nested_sub_configs(tmp_path):
    path = write(
        tmp_path,
        "run_name: demo\noptim:\n  lr: 1e-4\n  schedule: cosine\neval:\n"
        "  early_stopping: {metric: eval/loss, patience: 2}\nlambda:\n  rule: linear\n",
    )
    cfg = load_config(
        MethodConfig, path, ["optim.lr=3e-5", "eval.every=50", "lambda.init=2", "beta=0.2"]
    )
    assert cfg.run_name == "demo"
    assert cfg.optim == OptimConfig(lr=3e-5, schedule="cosine")
    assert cfg.eval.every == 50
    assert cfg.eval.early_stopping.metric == "eval/loss"
    assert cfg.eval.early_stopping.patience == 2
    assert cfg.lambda_ == LambdaConfig(rule="linear", init=2.0)
    assert cfg.beta == 0.2


def test_defaults_without_a_file():
    assert load_config(TrainConfig) == TrainConfig()


def test_unknown_yaml_key_names_file_and_nearest_spelling(tmp_path):
    path = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, path)
    message = str(info.value)
    assert str(path) in message
    assert "'optim.lrr'" in message
    assert "did you mean 'optim.lr'" in message


def test_unknown_key_at_the_wrong_level_suggests_where_it_lives(tmp_path):
    path = write(tmp_path, "lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"did you mean 'optim.lr'"):
        load_config(TrainConfig, path)


def test_unknown_override_key_names_the_override():
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, None, ["eval.early_stopping.patiense=3"])
    message = str(info.value)
    assert "override 'eval.early_stopping.patiense=3'" in message
    assert "did you mean 'eval.early_stopping.patience'" in message


def test_wrong_type_in_yaml_names_file_key_and_value(tmp_path):
    path = write(tmp_path, "epochs: three\n")
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, path)
    message = str(info.value)
    assert str(path) in message and "'epochs'" in message and "'three'" in message


def test_literal_value_gets_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'cosine'"):
        load_config(TrainConfig, None, ["optim.schedule=cosin"])


def test_invalid_value_from_post_init_names_its_source(tmp_path):
    path = write(tmp_path, "optim:\n  lr: -1.0\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml.*'optim'.*lr must be > 0"):
        load_config(TrainConfig, path)
    with pytest.raises(ConfigError, match=r"override 'optim.lr=-1'.*lr must be > 0"):
        load_config(TrainConfig, None, ["optim.lr=-1"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr=1e-5", 1e-5),  # YAML 1.1 reads 1e-5 as a string
        ("optim.lr=0.5", 0.5),
        ("optim.lr=2", 2.0),
    ],
)
def test_floats_parse_in_every_spelling(override, expected):
    assert load_config(TrainConfig, None, [override]).optim.lr == expected


def test_override_values_are_yaml_typed():
    cfg = load_config(
        TrainConfig,
        None,
        [
            "gradient_checkpointing=true",
            "max_steps=100",
            "optim.betas=[0.8, 0.95]",
            "logging.report_to=[jsonl, tensorboard]",
            "checkpoint.keep_last=null",
            "run_name=2024",  # a string field keeps the text
        ],
    )
    assert cfg.gradient_checkpointing is True
    assert cfg.max_steps == 100
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.logging.report_to == ["jsonl", "tensorboard"]
    assert cfg.checkpoint.keep_last is None
    assert cfg.run_name == "2024"


def test_a_single_name_is_a_one_item_list():
    assert load_config(TrainConfig, None, ["logging.report_to=wandb"]).logging.report_to == [
        "wandb"
    ]


@dataclass
class StrOrList:
    first_list: list[str] | str = field(default="x", metadata={"help": "List first."})
    first_str: str | list[str] = field(default="x", metadata={"help": "String first."})


@pytest.mark.parametrize("key", ["first_list", "first_str"])
def test_a_str_or_list_field_keeps_a_string_a_string_and_a_list_a_list(key, tmp_path):
    # peft reads target_modules='all-linear' as a shorthand and ['all-linear'] as a module name
    assert getattr(load_config(StrOrList, None, [f"{key}=all-linear"]), key) == "all-linear"
    path = write(tmp_path, f"{key}: all-linear\n")
    assert getattr(load_config(StrOrList, path), key) == "all-linear"
    assert getattr(load_config(StrOrList, None, [f"{key}=[q_proj]"]), key) == ["q_proj"]
    assert getattr(load_config(StrOrList, None, [f"{key}=[q, v]"]), key) == ["q", "v"]


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("gradient_checkpointing=yes please", r"must be a boolean"),
        ("max_steps=1.5", r"must be an integer or null"),
        ("optim.betas=[0.9]", r"must have 2 items"),
        ("logging.report_to=[jsonl, mlflow]", r"report_to\[1\]"),
        ("optim=3", r"'optim' must be a mapping"),
        ("optim.lr.value=3", r"it has no key 'value'"),
        ("no_equals_sign", r"must look like key=value"),
    ],
)
def test_bad_overrides_are_rejected(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(TrainConfig, None, [override])


def test_optional_sub_config_is_created_by_an_override():
    cfg = load_config(MethodConfig, None, ["lora.init=3"])
    assert cfg.lora == LambdaConfig(init=3.0)
    assert load_config(MethodConfig).lora is None


def test_dict_fields_type_their_values():
    assert load_config(MethodConfig, None, ["tags.a=1", "tags.b=2"]).tags == {"a": 1, "b": 2}
    with pytest.raises(ConfigError, match=r"'tags.a' must be an integer"):
        load_config(MethodConfig, None, ["tags.a=x"])


def test_override_of_a_mapping_merges_into_the_file(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.1\n  schedule: cosine\n")
    cfg = load_config(TrainConfig, path, ["optim={lr: 0.2}"])
    assert (cfg.optim.lr, cfg.optim.schedule) == (0.2, "cosine")


def test_bad_yaml_and_missing_file_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="top level must map"):
        load_config(TrainConfig, write(tmp_path, "- 1\n- 2\n"))


def test_missing_required_key_is_named():
    @dataclass
    class Needs:
        model: str = field(metadata={"help": "Model name."})

    with pytest.raises(ConfigError, match="missing required key 'model'"):
        load_config(Needs)
    assert load_config(Needs, None, ["model=tiny"]).model == "tiny"


def test_resolved_config_round_trips_and_records_versions(tmp_path):
    cfg = load_config(
        MethodConfig, None, ["optim.lr=3e-5", "lambda.rule=linear", "lora.init=0.5", "tags.x=3"]
    )
    path = save_resolved_config(cfg, tmp_path / "run" / "config.yaml")
    data = yaml.safe_load(path.read_text())
    assert {"alignkit", "torch", "transformers"} <= set(data[VERSIONS_KEY])
    assert data["lambda"] == {"rule": "linear", "init": 1.0}  # keyword field written bare
    assert data["optim"]["betas"] == [0.9, 0.999]
    assert load_config(MethodConfig, path) == cfg
    assert config_to_dict(load_config(MethodConfig, path)) == config_to_dict(cfg)


def test_run_dir_follows_resume_from():
    assert load_config(TrainConfig, None, ["output_dir=out", "run_name=a"]).run_dir == Path("out/a")
    assert load_config(TrainConfig, None, ["resume_from=elsewhere/b"]).run_dir == Path(
        "elsewhere/b"
    )


def _config_classes():
    return [
        value
        for module in (config_module, inputs_module)
        for value in vars(module).values()
        if isinstance(value, type)
        and dataclasses.is_dataclass(value)
        and value.__module__ == module.__name__
    ]


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__name__)
def test_every_shipped_config_field_has_help(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_data_subset_sizes_must_be_positive() -> None:
    from alignkit.trainers.sft import SFTConfig

    held_out = ["data.eval_file=heldout.jsonl", "data.max_eval_examples=7"]
    assert load_config(SFTConfig, None, held_out).data.max_eval_examples == 7
    with pytest.raises(ConfigError, match="max_train_examples must be >= 1"):
        load_config(SFTConfig, None, ["data.max_train_examples=0"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.learnig_rate=1e-4", "optim.lr"),
        ("learning_rate=1e-4", "optim.lr"),
        ("optim.learning_rate=1e-4", "optim.lr"),
        ("per_device_train_batch_size=8", "examples_per_device"),
        ("num_train_epochs=3", "epochs"),
        ("gradient_accumulation_steps=2", "grad_accum_steps"),
        ("beta=0.1", "dpo.beta"),
        ("loss_type=ipo", "dpo.kind"),
        ("logging_steps=5", "logging.every"),
    ],
)
def test_trl_names_and_misspellings_suggest_the_alignkit_key(override, expected):
    from alignkit.trainers.dpo import DPOConfig

    with pytest.raises(ConfigError, match=rf"did you mean '{re.escape(expected)}'\?"):
        load_config(DPOConfig, None, [override])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("num_generations=8", "rollout.samples_per_prompt"),
        ("rollout.num_generations=8", "rollout.samples_per_prompt"),
        ("beta=0.04", "kl.coef"),
        ("loss_type=dapo", "policy_loss.agg"),
        ("epsilon=0.2", "policy_loss.clip_ratio"),
        ("epsilon_high=0.28", "policy_loss.clip_ratio_high"),
        ("scale_rewards=none", "advantage.scale_rewards"),
        ("max_steps=20", "train.iterations"),
        ("learning_rate=1e-6", "optim.lr"),
        ("per_device_train_batch_size=8", "train.sequences_per_device"),
        ("gradient_accumulation_steps=4", "train.sequences_per_minibatch"),
        ("max_completion_length=64", "rollout.max_new_tokens"),
        ("num_iterations=2", "train.epochs_per_iteration"),
        ("num_train_epochs=1", "train.iterations"),
    ],
)
def test_trl_grpo_names_suggest_the_online_key(override, expected):
    # The TRL names a GRPO user types, each with the key of the online trainers (the same
    # name means another key in DPO: beta, loss_type, per_device_train_batch_size, ...).
    from alignkit.trainers.rl_config import PGConfig

    with pytest.raises(ConfigError) as info:
        load_config(PGConfig, None, [override])
    message = str(info.value)
    assert f"did you mean '{expected}'?" in message
    assert "precision" not in message  # epsilon used to suggest it


def test_a_trl_name_this_config_lacks_says_where_it_lives_instead_of_a_spelling_guess():
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, None, ["beta=0.1"])
    message = str(info.value)
    assert "did you mean" not in message
    assert "TRL's 'beta' is dpo.beta of the DPO family or kl.coef of the online-RL" in message
    with pytest.raises(ConfigError, match=r"TRL's 'use_vllm' is rollout\.engine of the online-RL"):
        load_config(TrainConfig, None, ["use_vllm=true"])
    with pytest.raises(ConfigError, match=r"'mask_truncated_completions' is policy_loss\."):
        load_config(TrainConfig, None, ["mask_truncated_completions=true"])


def test_every_key_of_the_trl_mapping_exists_in_a_config_of_its_scope():
    from alignkit.config.loader import _all_keys
    from alignkit.config.trl_names import TRL_OPTIONS
    from alignkit.trainers.dpo import DPOConfig
    from alignkit.trainers.reward import RewardConfig
    from alignkit.trainers.rl_config import PGConfig
    from alignkit.trainers.sft import SFTConfig

    scopes = {
        "offline": [SFTConfig, DPOConfig, RewardConfig],
        "dpo": [DPOConfig],
        "online": [PGConfig],
        "all": [SFTConfig, DPOConfig, RewardConfig, PGConfig],
    }
    for option in TRL_OPTIONS:
        assert option.targets or option.instead, option.name
        for target in option.targets:
            classes = scopes[target.scope]
            assert any(target.key in _all_keys(cls) for cls in classes), (option.name, target)


def test_the_migration_doc_table_is_the_mapping_the_loader_uses():
    from alignkit.config.trl_names import markdown_table

    doc = (Path(__file__).parents[1] / "docs" / "migrating-from-trl.md").read_text()
    table = doc.split("keeps them equal -->\n", 1)[1].split("<!-- end of the generated")[0]
    assert table.strip() == markdown_table().strip(), (
        "regenerate the table of docs/migrating-from-trl.md with "
        "alignkit.config.trl_names.markdown_table()"
    )
