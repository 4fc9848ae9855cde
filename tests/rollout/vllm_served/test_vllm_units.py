"""Pieces of the vLLM integration that need no vLLM: settings, errors, merged weights, preset."""

import copy
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from launch_helpers import free_port

from alignkit.errors import ConfigError
from alignkit.models import load_policy
from alignkit.rollout.vllm import VLLMClient, VLLMError, VLLMSettings, merged_state_dict
from alignkit.rollout.vllm.server import VLLMServer, worker_extension_path


def test_settings_refuse_a_url_and_a_launch_together():
    with pytest.raises(ConfigError, match="urls"):
        VLLMSettings(urls=["http://127.0.0.1:1"], python="/x/bin/python")
    with pytest.raises(ConfigError, match="dtype"):
        VLLMSettings(dtype="float64")


def test_server_command_and_environment(tmp_path):
    settings = VLLMSettings(python=str(tmp_path / "python"), dtype="bfloat16", enable_lora=True)
    (tmp_path / "python").write_text("")
    server = VLLMServer(settings, tmp_path / "model", tmp_path / "log")
    command = server.command()
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    for flag, value in [("--logprobs-mode", "processed_logprobs"), ("--dtype", "bfloat16")]:
        assert command[command.index(flag) + 1] == value
    assert "--enable-lora" in command and "--enforce-eager" in command
    # seeded requests: a split prefill would crash vLLM's CPU engine (see VLLMServer.command)
    assert "--no-enable-chunked-prefill" in command
    env = server.environment()
    # the trainer's sources never reach vLLM's interpreter; the worker extension does
    assert env["PYTHONPATH"] == str(worker_extension_path())
    assert (worker_extension_path() / "alignkit_vllm_worker.py").is_file()
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_missing_vllm_environment_is_a_clear_error(tmp_path):
    server = VLLMServer(VLLMSettings(python=str(tmp_path / "none")), tmp_path, tmp_path / "log")
    with pytest.raises(VLLMError, match="make vllm-venv"):
        server.command()


def test_worker_extension_imports_nothing_of_alignkit():
    text = (worker_extension_path() / "alignkit_vllm_worker.py").read_text()
    assert "alignkit." not in text.replace("alignkit.rollout", "")  # only prose names the package
    assert "import alignkit" not in text and "from alignkit" not in text


def test_refused_connection_fails_after_bounded_retries():
    client = VLLMClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.01, timeout=5)
    start = time.monotonic()
    with pytest.raises(VLLMError, match="failed after 3 attempt"):
        client.complete([1, 2], n=1, max_tokens=1, temperature=1.0)
    assert time.monotonic() - start < 5


class _Silent(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # never answers within the client's timeout
        time.sleep(3)

    def log_message(self, *args):
        pass


class _Failing(http.server.BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self):
        type(self).calls += 1
        self.send_response(503)
        self.end_headers()
        self.wfile.write(b"busy")

    def log_message(self, *args):
        pass


def _serve(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_call_that_times_out_is_an_error_not_a_hang():
    server = _serve(_Silent)
    try:
        client = VLLMClient(f"http://127.0.0.1:{server.server_port}", timeout=0.5, retries=3)
        start = time.monotonic()
        with pytest.raises(VLLMError, match=r"timed out after 0\.5 s"):
            client.score([[1, 2, 3]])
        assert time.monotonic() - start < 2.5  # not retried
    finally:
        server.shutdown()


def test_503_is_retried_then_reported():
    server = _serve(_Failing)
    try:
        client = VLLMClient(f"http://127.0.0.1:{server.server_port}", retries=2, backoff=0.01)
        with pytest.raises(VLLMError, match="HTTP 503: busy"):
            client.collective_rpc("anything")
        assert _Failing.calls == 3
    finally:
        server.shutdown()


def test_merged_state_dict_folds_lora_without_touching_the_model():
    pytest.importorskip("peft")
    model, _ = load_policy("tiny-hd64", lora={"r": 4, "alpha": 8})
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state_dict(model)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    # tied embeddings: written once, under the embedding's name
    assert "lm_head.weight" not in merged and "model.embed_tokens.weight" in merged
    assert set(merged) == set(expected) - {"lm_head.weight"}
    for key, value in merged.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_tiny_hd64_preset_has_head_dim_64():
    model, tokenizer = load_policy("tiny-hd64", seed=3)
    assert model.config.head_dim == 64 and model.config.hidden_size == 128
    assert sum(p.numel() for p in model.parameters()) == 533_120
    again, _ = load_policy("tiny-hd64", seed=3)
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)
    assert len(tokenizer) == model.config.vocab_size


def test_nccl_payloads_follow_vllms_weight_transfer_interface():
    from alignkit.rollout.vllm.nccl import init_payloads, update_info

    state = {"a.weight": torch.zeros(2, 3), "b.bias": torch.zeros(4, dtype=torch.bfloat16)}
    assert update_info(state) == {
        "names": ["a.weight", "b.bias"],
        "dtype_names": ["float32", "bfloat16"],
        "shapes": [[2, 3], [4]],
    }
    world, payloads = init_payloads([2, 1], bytes(range(128)))
    assert world == 4
    assert [p["rank_offset"] for p in payloads] == [1, 3]
    assert all(p["world_size"] == 4 and p["packed"] is False for p in payloads)
    import base64

    assert base64.b64decode(payloads[0]["nccl_unique_id_b64"]) == bytes(range(128))
    command = VLLMServer(
        VLLMSettings(weight_transfer="nccl", command=["vllm", "serve"]), "m", "l"
    ).command()
    assert command[:2] == ["vllm", "serve"]
    assert command[command.index("--weight-transfer-config") + 1] == '{"backend": "nccl"}'


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_started_server_dies_with_the_process_that_started_it(tmp_path):
    # The trainer killed by SIGKILL runs no atexit: the server must not outlive it.
    script = tmp_path / "parent.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "from alignkit.rollout.vllm.server import _die_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
        "                         start_new_session=True, preexec_fn=_die_with_parent)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[3] / "src")}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env)
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # alive
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the child outlived its parent")
