"""The sync probe's comparison logic, without vLLM."""

import pytest
import torch

from alignkit.errors import AlignkitError
from alignkit.models import load_policy
from alignkit.models.forward import token_logprobs
from alignkit.rollout.vllm.probe import (
    SyncProbe,
    SyncProbeError,
    compare_probe,
    default_probe_bounds,
)


def test_bounds_depend_on_the_dtypes():
    assert default_probe_bounds("float32", "float32") == (1e-3, 1e-3)
    assert default_probe_bounds("float32", "torch.float32") == (1e-3, 1e-3)
    for pair in [("bfloat16", "float32"), ("float32", "bfloat16"), ("float16", "float16")]:
        assert default_probe_bounds(*pair) == (1.0, 0.1)


def test_gap_is_the_max_abs_difference():
    engine = torch.tensor([-1.0, -2.0, -3.0])
    trainer = torch.tensor([-1.0, -2.5, -2.9])
    result = compare_probe(0, engine, trainer, max_gap=1.0, min_visible_change=0.1)
    assert result.max_abs == pytest.approx(0.5)
    assert result.mean_abs == pytest.approx(0.2)
    assert result.error() is None
    assert result.metrics()["rollout/sync_probe_max_abs"] == pytest.approx(0.5)
    assert result.engine_change is None and not result.stale


def test_gap_above_the_bound_is_an_error_naming_the_sync_and_numbers():
    result = compare_probe(
        7,
        torch.tensor([-1.0, -2.0]),
        torch.tensor([-1.0, -2.25]),
        max_gap=0.1,
        min_visible_change=0.0,
    )
    error = result.error("server A")
    assert isinstance(error, SyncProbeError) and isinstance(error, AlignkitError)
    assert "weight sync 7 (server A)" in str(error) and "0.25" in str(error) and "0.1" in str(error)


def test_nan_gap_is_an_error():
    result = compare_probe(
        1, torch.tensor([float("nan")]), torch.tensor([-1.0]), max_gap=1.0, min_visible_change=0.1
    )
    assert result.error() is not None


def test_stale_engine_is_caught_even_within_the_gap_bound():
    before = torch.tensor([-1.0, -2.0])
    trainer_now = torch.tensor([-1.05, -2.0])  # moved by 0.05, within max_gap = 1
    result = compare_probe(
        3, before, trainer_now, max_gap=1.0, min_visible_change=0.01,
        previous_engine=before, previous_trainer=before,
    )  # fmt: skip
    assert result.stale and result.max_abs < result.max_gap
    assert "STALE" in str(result.error())


def test_no_stale_alarm_when_the_trainer_change_is_not_visible():
    before = torch.tensor([-1.0, -2.0])
    trainer_now = torch.tensor([-1.001, -2.0])
    result = compare_probe(
        3, before, trainer_now, max_gap=1.0, min_visible_change=0.01,
        previous_engine=before, previous_trainer=before,
    )  # fmt: skip
    assert not result.stale and result.error() is None


def test_engine_that_moved_is_not_stale():
    before = torch.tensor([-1.0, -2.0])
    result = compare_probe(
        2, torch.tensor([-1.1, -2.0]), torch.tensor([-1.1, -2.0]), max_gap=1e-3,
        min_visible_change=1e-3, previous_engine=before, previous_trainer=before,
    )  # fmt: skip
    assert not result.stale and result.error() is None


def test_probe_remembers_each_server_and_raises():
    probe = SyncProbe([[1, 2, 3]], max_gap=0.5, min_visible_change=0.01)
    a = torch.tensor([-1.0, -2.0])
    probe.check(0, a, a, server="s1")
    probe.check(0, a + 1.0, a + 1.0, server="s2")  # another server: no previous of its own
    with pytest.raises(SyncProbeError, match="STALE"):
        probe.check(1, a, a - 0.2, server="s1")


def test_the_stale_test_compares_syncs_of_the_same_server_whatever_the_message():
    # A training run names each sync's iteration in its errors; the previous sync it compares
    # with is that of the same server (keying it by the message saw no stale weights at all).
    probe = SyncProbe([[1, 2, 3]], max_gap=5.0, min_visible_change=0.01)
    a = torch.tensor([-1.0, -2.0])
    probe.check(1, a, a, server="http://s1", where="server http://s1, after iteration 0")
    with pytest.raises(SyncProbeError, match="STALE") as caught:
        probe.check(2, a, a - 0.2, server="http://s1", where="server http://s1, after iteration 1")
    assert "weight sync 2 (server http://s1, after iteration 1)" in str(caught.value)


def test_probe_sequences_and_trainer_logprobs_match_token_logprobs():
    model, _ = load_policy("tiny")
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    probe = SyncProbe.from_prompts(
        prompts, count=2, continuation=2, max_gap=1e-3, min_visible_change=1e-3
    )
    assert probe.sequences == [[5, 6, 7, 8, 9], [8, 9, 10, 11]]
    flat = probe.trainer_logprobs(model)
    assert flat.shape == (4 + 3,)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    scored = torch.tensor([[0, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = token_logprobs(
            model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, scored
        )
    torch.testing.assert_close(flat[:4], expected[0, 1:], rtol=0, atol=1e-6)
    assert model.training is False


def test_probe_rejects_bad_input():
    with pytest.raises(ValueError):
        SyncProbe([[1]], max_gap=1.0, min_visible_change=0.1)
    with pytest.raises(ValueError):
        compare_probe(0, torch.zeros(2), torch.zeros(3), max_gap=1.0, min_visible_change=0.1)
