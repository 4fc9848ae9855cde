"""Run untrusted code in a separate process with OS limits, no network, a throwaway directory.

Modes, strongest first; ``mode="auto"`` takes the first that works on this machine (each is
probed once per process by running the interpreter in it):

- ``bwrap`` (bubblewrap, Debian package ``bubblewrap``): new mount, PID, network, IPC and UTS
  namespaces. The file system is read-only and holds only the system directories (``/usr``,
  ``/etc``, ...), the interpreter's directories, an empty ``/tmp`` and the run's own directory
  (``/sandbox``, read-write, the working directory); ``/proc`` shows only the sandbox's processes;
  when the sandbox's first process is killed, every process in it dies.
- ``unshare`` (util-linux): new network, PID and mount namespaces (its own ``/proc``). The file
  system is the host's, as far as the sandbox's user may read or write it.
- ``rlimits``: limits and a new session only: the network and the file system are open to the
  sandbox's user. A warning says so each time a sandbox is made in this mode.

In every mode:

- limits (``prlimit``): CPU seconds (SIGXCPU, then SIGKILL one second later), address space,
  size of any one file written (stdout and stderr included), open files, processes;
- a wall-clock limit, past which the process group is killed (with a PID namespace: everything);
- environment: ``PATH``, ``LANG``, ``HOME`` (the run directory) and nothing else;
- user: run by root, the code runs as a user id of its own (``1_000_000_000 + 256 * pid + slot``,
  one per concurrent run; 65534 if the kernel refuses it), so the process limit holds (root is
  exempt from it), root's files are out of reach, and every process left with that uid is killed
  after the run. Run by another user, the code runs as that user, and the process limit is set
  to that user's current process count plus the limit;
- stdout and stderr go to files the parent owns; at most ``output_bytes`` of each is read back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from alignkit.errors import AlignkitError

__all__ = ["MODES", "Sandbox", "SandboxError", "SandboxLimits", "SandboxResult"]

logger = logging.getLogger("alignkit.sandbox")

MODES = ("bwrap", "unshare", "rlimits")
_NOBODY = 65534
_UID_BASE = 1_000_000_000
_SLOTS = 256
_SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib64", "/lib32")
_INSIDE = "/sandbox"  # the run directory as bwrap shows it


class SandboxError(AlignkitError):
    """The sandbox cannot run as asked (mode not available here, a tool missing)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. ``processes`` counts every process of the sandbox's user."""

    cpu_seconds: int = 10
    wall_seconds: float = 20.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    processes: int = 32
    open_files: int = 64
    output_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "wall_seconds", "memory_mb", "file_size_mb", "processes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox limit {name} must be > 0, got {getattr(self, name)}")
        if self.open_files < 16 or self.output_bytes < 1:
            raise ValueError("sandbox limits: open_files must be >= 16 and output_bytes >= 1")


@dataclass(frozen=True)
class SandboxResult:
    """How a run ended: ``returncode`` (negative: killed by that signal), its output (cut at
    ``output_bytes``), and whether the wall-clock limit killed it."""

    returncode: int
    stdout: bytes
    stderr: bytes
    timed_out: bool


@dataclass(frozen=True)
class _Setup:
    mode: str
    python: str
    uid: int | None  # None: run as ourselves; _NOBODY; or -1 = one dedicated uid per slot


_SETUPS: dict[tuple[str, str], _Setup] = {}
_SETUP_LOCK = threading.Lock()
_FREE_SLOTS: queue.Queue[int] = queue.Queue()
for _slot in range(_SLOTS):
    _FREE_SLOTS.put(_slot)


def _slot_uid(slot: int) -> int:
    return _UID_BASE + (os.getpid() % 4_000_000) * _SLOTS + slot


class Sandbox:
    """Runs commands in the sandbox described in the module docstring.

    ``mode``: ``auto`` or one of ``MODES`` (an unavailable one is a ``SandboxError``).
    ``python``: the interpreter ``run_python`` uses (default: this process's).
    """

    def __init__(self, mode: str = "auto", *, python: str | None = None) -> None:
        if mode != "auto" and mode not in MODES:
            raise SandboxError(f"sandbox mode must be auto or one of {', '.join(MODES)}: {mode!r}")
        if not sys.platform.startswith("linux"):
            raise SandboxError("the sandbox needs Linux (namespaces, prlimit, setpriv)")
        for tool in ("prlimit", "setpriv"):
            if shutil.which(tool) is None:
                raise SandboxError(f"the sandbox needs '{tool}' (Debian package util-linux)")
        python = python or sys.executable
        with _SETUP_LOCK:
            key = (mode, python)
            if key not in _SETUPS:
                _SETUPS[key] = _choose(mode, python)
        self._setup = _SETUPS[key]
        if self.mode == "rlimits":
            logger.warning(
                "sandbox: mode 'rlimits': the code runs with CPU/memory/file/process limits but "
                "WITHOUT network isolation and sees the file system as its user may (install "
                "bubblewrap for the full sandbox)"
            )

    @property
    def mode(self) -> str:
        return self._setup.mode

    @property
    def python(self) -> str:
        return self._setup.python

    def run_python(
        self,
        script: str,
        *,
        files: Mapping[str, str | bytes] | None = None,
        stdin: bytes = b"",
        limits: SandboxLimits | None = None,
    ) -> SandboxResult:
        """Run ``python -I <script>`` (a file of ``files``) in a fresh run directory."""
        return self.run([self.python, "-I", script], files=files, stdin=stdin, limits=limits)

    def run(
        self,
        argv: Sequence[str],
        *,
        files: Mapping[str, str | bytes] | None = None,
        stdin: bytes = b"",
        limits: SandboxLimits | None = None,
    ) -> SandboxResult:
        """Run ``argv`` in a fresh run directory holding ``files`` (relative names); the
        directory is deleted afterwards. Never raises for what the code does."""
        return _run(self._setup, list(argv), dict(files or {}), stdin, limits or SandboxLimits())


def _run(
    setup: _Setup,
    argv: list[str],
    files: dict[str, str | bytes],
    stdin: bytes,
    limits: SandboxLimits,
) -> SandboxResult:
    slot = _FREE_SLOTS.get()
    uid = _slot_uid(slot) if setup.uid == -1 else setup.uid
    workdir = Path(tempfile.mkdtemp(prefix="alignkit-sandbox-"))
    try:
        for name, content in files.items():
            path = workdir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            data = content.encode() if isinstance(content, str) else content
            path.write_bytes(data)
        if uid is not None:
            for path in [workdir, *workdir.rglob("*")]:
                os.chown(path, uid, uid)
        command, cwd = _command(setup, argv, workdir, uid, limits)
        home = _INSIDE if setup.mode == "bwrap" else str(workdir)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            returncode, timed_out = _wait(command, cwd, env, stdin, out, err, limits)
            return SandboxResult(
                returncode=returncode,
                stdout=_head(out, limits.output_bytes),
                stderr=_head(err, limits.output_bytes),
                timed_out=timed_out,
            )
    finally:
        if setup.uid == -1:
            _kill_uid(uid)  # processes that left the process group (setsid + fork)
        shutil.rmtree(workdir, ignore_errors=True)
        _FREE_SLOTS.put(slot)


def _wait(
    command: list[str],
    cwd: str,
    env: dict[str, str],
    stdin: bytes,
    out: IO[bytes],
    err: IO[bytes],
    limits: SandboxLimits,
) -> tuple[int, bool]:
    with tempfile.TemporaryFile() as stdin_file:
        stdin_file.write(stdin)
        stdin_file.seek(0)
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=stdin_file,
            stdout=out,
            stderr=err,
            start_new_session=True,
            close_fds=True,
        )
    timed_out = False
    try:
        proc.wait(timeout=limits.wall_seconds)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        # The whole group, even after a normal exit: a child it left behind goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # unkillable (D state): leave it, never hang
            logger.warning("sandbox: process %d did not die after SIGKILL", proc.pid)
    return (proc.returncode if proc.returncode is not None else -signal.SIGKILL), timed_out


def _head(file: IO[bytes], limit: int) -> bytes:
    file.seek(0)
    return file.read(limit)


def _command(
    setup: _Setup, argv: list[str], workdir: Path, uid: int | None, limits: SandboxLimits
) -> tuple[list[str], str]:
    nproc = limits.processes if uid is not None else _own_processes() + limits.processes
    inner = [
        "prlimit",
        f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}",
        f"--as={limits.memory_mb << 20}",
        f"--fsize={limits.file_size_mb << 20}",
        f"--nofile={limits.open_files}",
        f"--nproc={nproc}",
        "--",
    ]
    if uid is not None:
        inner += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    inner += argv
    if setup.mode == "bwrap":
        return ["bwrap", *_bwrap_args(setup.python, workdir, uid is None), "--", *inner], "/"
    if setup.mode == "unshare":
        user = ["--user", "--map-root-user"] if os.geteuid() != 0 else []
        flags = ["--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
        return ["unshare", *user, *flags, "--", *inner], str(workdir)
    return inner, str(workdir)


def _bwrap_args(python: str, workdir: Path, user_namespace: bool) -> list[str]:
    args = []
    for directory in _SYSTEM_DIRS:
        if os.path.islink(directory):
            args += ["--symlink", os.readlink(directory), directory]
        elif os.path.isdir(directory):
            args += ["--ro-bind", directory, directory]
    for directory in _interpreter_dirs(python):
        if not any(directory.startswith(d + "/") or directory == d for d in _SYSTEM_DIRS):
            args += ["--ro-bind", os.path.realpath(directory), directory]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    args += ["--bind", str(workdir), _INSIDE, "--chdir", _INSIDE]
    args += ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    args += ["--unshare-cgroup-try", "--hostname", "sandbox", "--die-with-parent", "--new-session"]
    if user_namespace:  # not root: the namespaces need a user namespace
        args.append("--unshare-user")
    return args


def _interpreter_dirs(python: str) -> list[str]:
    """The directories an interpreter needs: its prefix (a venv) and its base installation."""
    if python == sys.executable:
        dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    else:
        dirs = {str(Path(python).parent.parent), str(Path(os.path.realpath(python)).parent.parent)}
    return sorted(dirs)


def _own_processes() -> int:
    import psutil

    uid = os.getuid()
    count = 0
    for proc in psutil.process_iter(["uids"]):
        uids = proc.info.get("uids")
        count += uids is not None and uids.real == uid
    return count


def _kill_uid(uid: int | None) -> None:
    if uid is None:
        return
    # kill(-1) as that uid reaches every process of the uid (and nothing else).
    command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    command += ["kill", "-KILL", "-1"]
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def _choose(mode: str, python: str) -> _Setup:
    """The strongest working setup for ``mode`` (or ``auto``), by running the interpreter."""
    modes = MODES if mode == "auto" else (mode,)
    uids: list[int | None] = [-1, _NOBODY, None] if os.geteuid() == 0 else [None]
    pythons = [python] + ([] if python != sys.executable else _system_pythons())
    failures = []
    for candidate_mode in modes:
        if candidate_mode != "rlimits" and shutil.which(candidate_mode) is None:
            failures.append(f"{candidate_mode}: not installed")
            continue
        for uid in uids:
            for candidate_python in pythons:
                setup = _Setup(candidate_mode, candidate_python, uid)
                problem = _probe(setup)
                if problem is None:
                    if uid is None and os.geteuid() == 0:
                        logger.warning(
                            "sandbox: cannot switch to an unprivileged user id; the code runs "
                            "as root inside the sandbox and the process limit does not hold"
                        )
                    return setup
                failures.append(f"{candidate_mode} (uid {uid}, {candidate_python}): {problem}")
    raise SandboxError("no sandbox mode works here: " + "; ".join(failures))


def _system_pythons() -> list[str]:
    # A dropped uid cannot reach an interpreter under /root (pyenv): try the system one too.
    found = shutil.which("python3", path="/usr/bin:/bin")
    return [found] if found and os.path.realpath(found) != os.path.realpath(sys.executable) else []


def _probe(setup: _Setup) -> str | None:
    code = "import os, socket\nprint(6 * 7)\n"
    limits = SandboxLimits(cpu_seconds=10, wall_seconds=30)
    result = _run(setup, [setup.python, "-I", "probe.py"], {"probe.py": code}, b"", limits)
    if result.returncode == 0 and result.stdout.strip() == b"42":
        return None
    return (result.stderr or result.stdout).decode(errors="replace").strip()[-200:] or (
        f"exit code {result.returncode}"
    )
