"""GPU weight sync through vLLM's own weight-transfer API (NCCL broadcast from the trainer).

NOT RUN IN THIS PROJECT'S CI OR ON ITS DEVELOPERS' MACHINES (no GPU): written against vLLM 0.32's
documented interface (``vllm/distributed/weight_transfer/nccl_engine.py``, ``nccl_common.py`` and
the RL routes of ``vllm/entrypoints/rl/online/api_router.py``); only its payloads are tested here.

The server runs with ``--weight-transfer-config '{"backend": "nccl"}'`` and
``VLLM_SERVER_DEV_MODE=1`` (which registers the RL routes). alignkit does not import vllm, so the
trainer side uses the rendezvous vLLM provides for trainers without vllm ("torch-free trainers"
in its docstring): the trainer mints an ``ncclUniqueId`` with NCCL itself (ctypes, the
``libnccl.so.2`` that CUDA builds of torch ship) and sends it base64-encoded to
``POST /init_weight_transfer_engine``; trainer (rank 0) and workers (ranks ``rank_offset``...) run
``ncclCommInitRank`` concurrently, then the one-element float32 all-reduce warm-up vLLM's
communicator issues. Each sync: ``POST /start_weight_update``, ``POST /update_weights`` with the
names, dtypes and shapes (not packed) while the trainer broadcasts every tensor from rank 0 in that
order, ``POST /finish_weight_update`` (vLLM's layerwise reload finishes there), then
``POST /reset_prefix_cache``.
"""

from __future__ import annotations

import base64
import ctypes
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.rollout.vllm.client import VLLMClient, VLLMError
from alignkit.rollout.vllm.server import SERVED_MODEL_NAME
from alignkit.rollout.vllm.sync import merged_state_dict

__all__ = ["NCCLWeightSync", "init_payloads", "update_info"]

_NCCL_DTYPES = {
    torch.int8: 0, torch.uint8: 1, torch.int32: 2, torch.int64: 4,
    torch.float16: 6, torch.float32: 7, torch.float64: 8, torch.bfloat16: 9,
}  # fmt: skip


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]


def update_info(state: Mapping[str, Tensor]) -> dict[str, list[Any]]:
    """``update_info`` of ``POST /update_weights`` for tensors broadcast in ``state``'s order."""
    return {
        "names": list(state),
        "dtype_names": [str(t.dtype).removeprefix("torch.") for t in state.values()],
        "shapes": [list(t.shape) for t in state.values()],
    }


def init_payloads(workers: Sequence[int], unique_id: bytes) -> tuple[int, list[dict[str, Any]]]:
    """The NCCL world size and each server's ``init_info``: the trainer is rank 0, server ``i``'s
    workers follow the workers of servers ``0..i-1`` (vLLM adds a worker's own rank within its
    server to ``rank_offset``)."""
    world = 1 + sum(workers)
    encoded = base64.b64encode(unique_id).decode()
    payloads, offset = [], 1
    for count in workers:
        payloads.append(
            {
                "nccl_unique_id_b64": encoded,
                "rank_offset": offset,
                "world_size": world,
                "packed": False,
            }
        )
        offset += count
    return world, payloads


def _load_nccl() -> ctypes.CDLL:
    path = os.environ.get("ALIGNKIT_NCCL_LIBRARY")
    if path is None:
        try:
            import nvidia.nccl  # the nvidia-nccl wheel CUDA builds of torch depend on

            path = os.path.join(next(iter(nvidia.nccl.__path__)), "lib", "libnccl.so.2")
        except ImportError:
            path = "libnccl.so.2"
    try:
        return ctypes.CDLL(path)
    except OSError as err:
        raise VLLMError(
            f"NCCL weight sync needs libnccl.so.2 ({path}: {err}); set ALIGNKIT_NCCL_LIBRARY"
        ) from err


class NCCLWeightSync:
    """Weights broadcast over NCCL to every worker of every server (see the module docstring).

    Args:
        clients: one per server.
        workers: NCCL workers per server (tensor x pipeline parallel size); 1 each by default.
        device: the CUDA device the trainer sends from.
    """

    served_model = SERVED_MODEL_NAME

    def __init__(
        self,
        clients: Sequence[VLLMClient],
        workers: Sequence[int] | None = None,
        device: torch.device | None = None,
    ) -> None:
        if not torch.cuda.is_available():
            raise VLLMError("NCCL weight sync needs a CUDA GPU; use the file sync on CPU")
        self.clients = list(clients)
        self.workers = list(workers or [1] * len(self.clients))
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        self.lib = _load_nccl()
        self.comm = ctypes.c_void_p()
        self._connect()

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            self.lib.ncclGetErrorString.restype = ctypes.c_char_p
            raise VLLMError(f"NCCL {what} failed: {self.lib.ncclGetErrorString(result).decode()}")

    def _connect(self) -> None:
        unique_id = _UniqueId()
        self._check(self.lib.ncclGetUniqueId(ctypes.byref(unique_id)), "ncclGetUniqueId")
        world, payloads = init_payloads(self.workers, bytes(unique_id.internal))
        with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
            # The workers block in their ncclCommInitRank until rank 0 joins: all at once.
            pending = [
                pool.submit(c.request, "POST", "/init_weight_transfer_engine", {"init_info": p})
                for c, p in zip(self.clients, payloads, strict=True)
            ]
            with torch.cuda.device(self.device):
                self._check(
                    self.lib.ncclCommInitRank(ctypes.byref(self.comm), world, unique_id, 0),
                    "ncclCommInitRank",
                )
                warm = torch.zeros(1, device=self.device)  # vLLM's communicator warm-up
                self._collective("ncclAllReduce", warm, 0)
            for future in pending:
                future.result()

    def _collective(self, name: str, tensor: Tensor, root_or_op: int) -> None:
        stream = ctypes.c_void_p(torch.cuda.current_stream(self.device).cuda_stream)
        pointer = ctypes.c_void_p(tensor.data_ptr())
        count = ctypes.c_size_t(tensor.numel())
        dtype = _NCCL_DTYPES[tensor.dtype]
        # ncclAllReduce(send, recv, count, dtype, op, comm, stream);
        # ncclBroadcast(send, recv, count, dtype, root, comm, stream)
        result = getattr(self.lib, name)(
            pointer, pointer, count, dtype, root_or_op, self.comm, stream
        )
        self._check(result, name)

    def push(self, model: nn.Module, version: int) -> dict[str, float]:
        start = time.perf_counter()
        state = {k: v.to(self.device).contiguous() for k, v in merged_state_dict(model).items()}
        info = update_info(state)
        for client in self.clients:
            client.request("POST", "/start_weight_update")
        with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
            receiving = [
                pool.submit(c.request, "POST", "/update_weights", {"update_info": info})
                for c in self.clients
            ]
            for tensor in state.values():
                self._collective("ncclBroadcast", tensor, 0)
            torch.cuda.current_stream(self.device).synchronize()
            for future in receiving:  # bounded by the clients' request timeout
                future.result()
        for client in self.clients:
            client.request("POST", "/finish_weight_update", {"weight_version": str(version)})
            client.reset_prefix_cache()
        return {
            "timing/sync_push_load": time.perf_counter() - start,
            "rollout/weight_sync_bytes": float(
                sum(t.numel() * t.element_size() for t in state.values())
            ),
        }
