"""Rollouts served by vLLM, from its own environment (nothing here imports vllm).

- ``server``: start ``python -m vllm.entrypoints.openai.api_server`` from the vLLM venv (or a
  configured command), or connect to running servers; health wait, log file, process-group kill.
- ``client``: HTTP with timeouts and bounded retries; token ids in, token ids and log-probs out.
- ``sync``: weight push (safetensors file + worker extension; LoRA adapter only); ``nccl``: the
  GPU path through vLLM's weight-transfer API.
- ``probe``: the verified sync (engine vs trainer log-probs on a fixed probe after every sync).
- ``engine``: ``VLLMEngine``.

Set-up and measurements: ``docs/vllm.md``.
"""

from alignkit.rollout.vllm.client import Completion, VLLMClient, VLLMError
from alignkit.rollout.vllm.engine import VLLMEngine
from alignkit.rollout.vllm.probe import (
    ProbeComparison,
    SyncProbe,
    SyncProbeError,
    compare_probe,
    default_probe_bounds,
)
from alignkit.rollout.vllm.server import VLLMServer, VLLMSettings, default_vllm_python, open_servers
from alignkit.rollout.vllm.sync import FileWeightSync, LoRAAdapterSync, merged_state_dict

__all__ = [
    "Completion",
    "FileWeightSync",
    "LoRAAdapterSync",
    "ProbeComparison",
    "SyncProbe",
    "SyncProbeError",
    "VLLMClient",
    "VLLMEngine",
    "VLLMError",
    "VLLMServer",
    "VLLMSettings",
    "compare_probe",
    "default_probe_bounds",
    "default_vllm_python",
    "merged_state_dict",
    "open_servers",
]
