"""Push the trainer's weights to vLLM servers.

Three ways, one interface (``push(model, version) -> stats``; ``served_model`` is the name to
generate with afterwards):

- :class:`FileWeightSync` (works on CPU and GPU, tested here): the weights are written as one
  safetensors file to a directory the servers can read, then every worker of every server loads
  it through vLLM's worker-extension interface (``POST /collective_rpc`` calling
  ``alignkit_load_weights`` of ``rollout/vllm/worker/alignkit_vllm_worker.py``). A LoRA policy is
  pushed MERGED (``W + (alpha / r) B A`` computed from the live adapter without touching the
  model): the server needs no LoRA support.
- :class:`LoRAAdapterSync` (tested here): only the adapter is saved and loaded in place through
  ``POST /v1/load_lora_adapter`` (the server runs with ``--enable-lora`` and
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``); rollouts then name the adapter as the model.
- ``NCCLWeightSync`` in ``rollout.vllm.nccl`` (GPU only; never run here): vLLM's own weight-transfer
  API, the server started with ``--weight-transfer-config '{"backend": "nccl"}'``.

Every push ends with ``POST /reset_prefix_cache`` on every server: vLLM's prefix cache holds KV
blocks computed with the old weights, and reusing them after a sync would sample new rollouts
partly from the old policy (a staleness the sync probe, which scores without the cache, would
not see).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from alignkit.models.lora import has_adapter, unwrap_model
from alignkit.rollout.vllm.client import VLLMClient, VLLMError
from alignkit.rollout.vllm.server import SERVED_MODEL_NAME

__all__ = ["FileWeightSync", "LoRAAdapterSync", "WeightSync", "merged_state_dict"]

LORA_NAME = "policy-lora"


class WeightSync(Protocol):
    """Pushes the policy's current weights to the servers."""

    served_model: str

    def push(self, model: nn.Module, version: int) -> dict[str, float]: ...


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The policy's weights under the base model's names, a LoRA adapter folded in.

    For each LoRA layer the served weight is ``W + delta`` with peft's own ``get_delta_weight``
    (``(alpha / r) B A``) of every active adapter, computed on copies: merging into the live
    model and unmerging would round the base weights a little more at every sync. Tensors that
    share storage (tied embeddings) are written once, under their first name.
    """
    model = unwrap_model(model)
    state: dict[str, Tensor] = {}
    if not has_adapter(model):
        items = model.state_dict().items()
    else:
        base = model.get_base_model()
        merged: dict[str, Tensor] = {}
        for name, module in base.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                weight = module.base_layer.weight.detach()
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
                merged[f"{name}.weight"] = weight
        items = []
        for key, value in base.state_dict().items():
            if "lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
            items.append((key, merged.get(key, value)))
    seen: set[int] = set()
    for key, value in items:
        if value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        state[key] = value.detach().contiguous()
    return state


class FileWeightSync:
    """Weights through a shared directory and the alignkit worker extension.

    Args:
        clients: one per server.
        directory: readable by every server at the same path (a local directory for a server on
            this machine, a shared file system otherwise).
    """

    served_model = SERVED_MODEL_NAME

    def __init__(self, clients: Sequence[VLLMClient], directory: str | Path) -> None:
        self.clients = list(clients)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._last: Path | None = None

    def push(self, model: nn.Module, version: int) -> dict[str, float]:
        from safetensors.torch import save_file

        start = time.perf_counter()
        state = {k: v.cpu() for k, v in merged_state_dict(model).items()}
        path = self.directory / f"weights-{version}.safetensors"
        partial = path.with_name(path.name + ".partial")
        save_file(state, str(partial))
        os.replace(partial, path)  # a worker never reads a half-written file
        written = time.perf_counter()
        for client in self.clients:
            results = client.collective_rpc("alignkit_load_weights", [str(path.resolve())])
            if not results:
                raise VLLMError(
                    f"vLLM {client.url}: alignkit_load_weights returned nothing; is the server "
                    "running with --worker-extension-cls alignkit_vllm_worker.AlignkitWorkerExtension?"
                )
            for result in results:
                if not isinstance(result, dict) or result.get("tensors") != len(state):
                    raise VLLMError(
                        f"vLLM {client.url}: a worker loaded {result!r} from {path}, expected "
                        f"{len(state)} tensors"
                    )
            client.reset_prefix_cache()
        if self._last is not None and self._last != path:
            self._last.unlink(missing_ok=True)
        self._last = path
        return {
            "timing/sync_push_write": written - start,
            "timing/sync_push_load": time.perf_counter() - written,
            "rollout/weight_sync_bytes": float(
                sum(v.numel() * v.element_size() for v in state.values())
            ),
        }


class LoRAAdapterSync:
    """Only the LoRA adapter, loaded in place as ``policy-lora`` on every server."""

    served_model = LORA_NAME

    def __init__(self, clients: Sequence[VLLMClient], directory: str | Path) -> None:
        self.clients = list(clients)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._last: Path | None = None

    def push(self, model: nn.Module, version: int) -> dict[str, float]:
        model = unwrap_model(model)
        if not has_adapter(model):
            raise VLLMError("adapter-only weight sync needs a LoRA policy (model.lora)")
        start = time.perf_counter()
        out = self.directory / f"adapter-{version}"
        partial = out.with_name(out.name + ".partial")
        with torch.no_grad():
            model.save_pretrained(str(partial))
        if out.exists():
            raise VLLMError(f"{out} exists already: each sync needs a fresh adapter version")
        os.replace(partial, out)
        written = time.perf_counter()
        for client in self.clients:
            client.load_lora_adapter(LORA_NAME, str(out.resolve()))
            client.reset_prefix_cache()
        size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        if self._last is not None:
            shutil.rmtree(self._last, ignore_errors=True)
        self._last = out
        return {
            "timing/sync_push_write": written - start,
            "timing/sync_push_load": time.perf_counter() - written,
            "rollout/weight_sync_bytes": float(size),
        }
