"""`alignkit train METHOD --help` lists that method's config keys; `alignkit config METHOD`
prints a complete default config that loads back to the same defaults."""

from __future__ import annotations

import pytest

from alignkit.cli import main
from alignkit.cli.train import method_defaults
from alignkit.config import describe_config, describe_defaults, load_config
from alignkit.trainers.registry import METHODS


def run(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def test_train_help_lists_the_methods_own_keys(capsys):
    dpo = run(capsys, "train", "dpo", "--help")
    sft = run(capsys, "train", "sft", "--help")
    assert "dpo.beta = 0.1  (a number)  Inverse temperature of the log-ratios." in dpo
    assert "optim.lr = 1e-05" in dpo and "optim.lr = 1e-05" in sft
    assert "packing = False" in sft and "dpo.beta" not in sft
    assert "`alignkit config sft`" in sft


@pytest.mark.parametrize("method", ["sft", "dpo", "safe-dpo", "rm", "cost"])
def test_config_prints_every_default_as_loadable_yaml(method, capsys, tmp_path):
    text = run(capsys, "config", method)
    path = tmp_path / "defaults.yaml"
    path.write_text(text)
    defaults = method_defaults(method)
    assert load_config(type(defaults), path) == defaults
    assert "  lr: 1.0e-05  # Peak learning rate of AdamW." in text
    if method == "cost":
        assert "\nkind: cost" in text


@pytest.mark.parametrize("method", sorted(METHODS))
def test_help_read_from_the_class_matches_the_constructed_defaults(method):
    # `train METHOD --help` describes the config class without constructing it (no torch);
    # it must show what `alignkit config METHOD` constructs, except what __post_init__ derives.
    chosen = METHODS[method]
    # rm-ensemble's defaults do not construct (it needs a held-out file); its help still works
    extra = ("data.eval_file=heldout.jsonl",) if method == "rm-ensemble" else ()
    overrides = (*chosen.defaults, *extra)
    from_class = describe_defaults(chosen.load_config_class(), overrides)
    constructed = describe_config(load_config(chosen.load_config_class(), None, overrides))
    # Set by __post_init__: a critic when the estimator needs one; rm-ensemble's early-stopping
    # metric (eval/accuracy when none is given).
    derived = ("critic", "cost_critic")
    derived_keys = ("eval.early_stopping.metric",) if method == "rm-ensemble" else ()

    def described(rows):
        return [r for r in rows if r[0].split(".")[0] not in derived and r[0] not in derived_keys]

    assert described(from_class) == described(constructed)
