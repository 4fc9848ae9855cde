"""``precision: auto | fp32 | bf16`` (runloop.precision), the autocast rule, and ``mfu``."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console
from torch import nn

from alignkit.config import TrainConfig, load_config
from alignkit.errors import ConfigError
from alignkit.models.tiny import build_tiny_model, load_tiny_tokenizer
from alignkit.rollout.engine import unwrap_for_generation
from alignkit.runloop import precision as precision_module
from alignkit.runloop.flops import ModelFlops, matmul_rate, non_embedding_parameters
from alignkit.runloop.precision import (
    AUTO_BF16_MIN_HIDDEN,
    matmul_width,
    native_bf16,
    resolve_precision,
)
from alignkit.runloop.runtime import make_accelerator
from alignkit.trainers.loop import Trainer

CPU = torch.device("cpu")
YES = "yes: CPU with AMX-BF16 (torch CPU capability AVX512)"


class Wide(nn.Module):
    def __init__(self, width: int = 256, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 1)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU that runs bf16 matmuls natively, whatever this machine's is."""
    monkeypatch.setattr(precision_module, "_native_bf16_cpu", lambda: YES)


@pytest.fixture
def plain_cpu(monkeypatch):
    no = "this CPU has no bf16 matmul units (no AMX-BF16, AVX-512 BF16 or Arm BF16)"
    monkeypatch.setattr(precision_module, "_native_bf16_cpu", lambda: no)


def test_explicit_settings_are_taken_as_they_are(plain_cpu):
    for name in ("fp32", "bf16"):
        chosen = resolve_precision(name, Wide(), CPU)
        assert (chosen.name, chosen.requested, chosen.reason) == (name, name, "set explicitly")


def test_auto_picks_bf16_on_bf16_hardware_for_a_wide_float32_model(bf16_cpu):
    chosen = resolve_precision("auto", Wide(AUTO_BF16_MIN_HIDDEN), CPU)
    assert chosen.name == "bf16" and chosen.dtype == torch.bfloat16
    assert chosen.reason == "CPU with AMX-BF16 (torch CPU capability AVX512)"
    assert chosen.describe().startswith("bf16 (auto: CPU with AMX-BF16")


def test_auto_keeps_fp32_without_bf16_units(plain_cpu):
    chosen = resolve_precision("auto", Wide(), CPU)
    assert chosen.name == "fp32" and "no bf16 matmul units" in chosen.reason


def test_auto_keeps_fp32_for_small_matmuls_and_non_float32_weights(bf16_cpu):
    narrow = resolve_precision("auto", Wide(AUTO_BF16_MIN_HIDDEN - 1), CPU)
    assert narrow.name == "fp32" and narrow.reason.startswith("hidden size 127 < 128")
    tiny = build_tiny_model(load_tiny_tokenizer())  # hidden 64: bf16 measured 1.6x slower
    assert resolve_precision("auto", tiny, CPU).name == "fp32"
    halved = resolve_precision("auto", Wide(dtype=torch.bfloat16), CPU)
    assert halved.name == "fp32" and "weights are torch.bfloat16" in halved.reason


def test_matmul_width_reads_the_config_or_the_linear_layers():
    assert matmul_width(build_tiny_model(load_tiny_tokenizer())) == 64
    assert matmul_width(Wide(300)) == 300
    assert matmul_width(nn.ReLU()) is None


def test_hardware_detection_names_what_it_found(monkeypatch):
    precision_module._native_bf16_cpu.cache_clear()
    monkeypatch.setattr(precision_module, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(precision_module, "_torch_cpu_check", lambda name: False)
    try:
        assert native_bf16(CPU).startswith("yes: CPU with AVX-512 BF16")
        precision_module._native_bf16_cpu.cache_clear()
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
        assert native_bf16(CPU) == "ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN off the bf16 units"
        precision_module._native_bf16_cpu.cache_clear()
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
        monkeypatch.setattr(precision_module, "_cpu_flags", lambda: {"avx2", "fma"})
        assert native_bf16(CPU).startswith("this CPU has no bf16 matmul units")
        assert "not known" in native_bf16(torch.device("meta"))
    finally:
        precision_module._native_bf16_cpu.cache_clear()


def test_an_unknown_precision_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="'precision' must be one of 'auto', 'fp32', 'bf16'"):
        load_config(TrainConfig, None, [f"output_dir={tmp_path}", "precision=fp16"])
    assert load_config(TrainConfig, None, [f"output_dir={tmp_path}"]).precision == "auto"
    with pytest.raises(ValueError, match="resolve it first"):
        make_accelerator(load_config(TrainConfig, None, [f"output_dir={tmp_path}"]))


# --------------------------------------------------------------------------------------
# A run: what it says, where autocast applies, mfu
# --------------------------------------------------------------------------------------


class Regression(Trainer):
    def compute_loss(self, model, batch):
        self.dtypes = getattr(self, "dtypes", [])
        hidden = model.net[0](batch["x"])
        self.dtypes.append(hidden.dtype)
        return ((model.net[2](hidden.relu()).squeeze(-1) - batch["y"]) ** 2).mean(), {}


def rows(n: int = 32) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    y = x @ torch.randn(4, generator=generator)
    mask = torch.ones(3, dtype=torch.long)
    return [{"x": a, "y": b, "attention_mask": mask} for a, b in zip(x, y, strict=True)]


def config(tmp_path, name: str, *overrides: str) -> TrainConfig:
    settings = [f"output_dir={tmp_path}", f"run_name={name}", "logging.plots=false"]
    return load_config(TrainConfig, None, [*settings, "max_steps=4", *overrides])


def test_the_start_up_table_and_the_summary_say_what_auto_chose_and_why(tmp_path, bf16_cpu):
    trainer = Regression(config(tmp_path, "auto", "logging.every=2"), Wide(), rows())
    trainer.console = Console(file=io.StringIO(), width=200)
    summary = trainer.train()
    assert summary["precision"] == {
        "name": "bf16",
        "requested": "auto",
        "reason": "CPU with AMX-BF16 (torch CPU capability AVX512)",
    }
    assert set(trainer.dtypes) == {torch.bfloat16}  # the forward ran under autocast
    assert next(trainer.unwrapped_model.parameters()).dtype == torch.float32  # master weights
    table = trainer.console.file.getvalue()
    assert "run set-up" in table and "why (auto)" in table and "AMX-BF16" in table
    assert json.loads((tmp_path / "auto" / "summary.json").read_text())["precision"]["name"] == (
        "bf16"
    )
    quiet = Regression(
        config(tmp_path, "quiet", "logging.progress_bar=false", 'logging.console_format=""'),
        Wide(),
        rows(),
    )
    quiet.console = Console(file=io.StringIO(), width=200)
    assert quiet.train()["precision"]["name"] == "bf16"
    assert quiet.console.file.getvalue() == ""


def test_prepared_models_keep_their_own_forward_and_run_bf16_only_under_autocast(tmp_path):
    trainer = Regression(config(tmp_path, "wrap", "precision=bf16"), Wide(), rows())
    model = trainer.accelerator.prepare_model(Wide())
    x = torch.randn(2, 4)
    assert model(x).dtype == torch.float32  # no wrapper: plain fp32 outside autocast
    with trainer.accelerator.autocast():
        assert model(x).dtype == torch.bfloat16  # no float32 copy of the outputs either
    # A generation engine unwrapping the model for sampling changes nothing for the trainer.
    assert unwrap_for_generation(model) is model
    assert "_original_forward" not in vars(model) and "forward" not in vars(model)


def test_every_logged_step_has_its_mfu_against_the_chosen_precisions_peak(tmp_path):
    trainer = Regression(config(tmp_path, "mfu", "logging.every=2"), Wide(), rows())
    summary = trainer.train()
    records = [json.loads(line) for line in (tmp_path / "mfu" / "metrics.jsonl").open()]
    flops = ModelFlops.of(trainer.unwrapped_model)
    assert flops.head == 0 and flops.body == non_embedding_parameters(trainer.unwrapped_model)
    assert flops.shapes == (256, 256)
    peak = summary["peak_flops_per_s"]
    assert peak > 0
    for record in records:
        # mfu = 6 N tokens per second / peak: both from the same window's clock.
        expected = 6 * flops.body * record["tokens_per_s"] / peak
        assert record["mfu"] == pytest.approx(expected, rel=1e-5)


def test_model_flops_count_the_lm_head_on_scored_tokens_only():
    model = build_tiny_model(load_tiny_tokenizer())
    flops = ModelFlops.of(model)
    assert flops.head == 1024 * 64  # tied: the embedding's weight is the LM head's
    assert flops.body == non_embedding_parameters(model) == 166_208 - 1024 * 64
    assert flops.training(10, 4) == 6 * flops.body * 10 + 6 * flops.head * 4
    assert flops.inference(10, 4) == 2 * flops.body * 10 + 2 * flops.head * 4
    assert flops.shapes == (64, 176)


def test_matmul_rate_reports_its_dtype_and_shapes():
    rate = matmul_rate(32, 64, dtype=torch.bfloat16, tokens=16, repeats=1, repeat_s=0.001)
    assert rate["dtype"] == "bfloat16" and rate["flops_per_s"] > 0
    assert [s["shape"] for s in rate["shapes"]] == [[16, 32, 32], [16, 32, 64], [16, 64, 32]]
