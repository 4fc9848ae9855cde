"""The sandbox contains hostile code in each mode this machine offers (the others are skipped,
each with its reason): fork bomb, infinite loop, memory hog, writes outside its directory,
network, the parent's environment and secret files."""

from __future__ import annotations

import contextlib
import os
import socket
import threading

import psutil
import pytest

from alignkit.rollout.verifiers.sandbox import (
    _UID_BASE,
    MODES,
    Sandbox,
    SandboxError,
    SandboxLimits,
)

FAST = SandboxLimits(cpu_seconds=2, wall_seconds=10, memory_mb=512, processes=16)


@pytest.fixture(scope="module", params=MODES)
def sandbox(request) -> Sandbox:
    try:
        box = Sandbox(request.param)
    except SandboxError as err:
        pytest.skip(f"sandbox mode {request.param} is not available here: {err}")
    assert box.mode == request.param
    return box


def _run(box: Sandbox, code: str, limits: SandboxLimits = FAST):
    return box.run_python("main.py", files={"main.py": code}, limits=limits)


def _sandbox_processes_left() -> list[psutil.Process]:
    """Processes of sandbox uids still alive 10 s after the run (the kernel tears a killed PID
    namespace down asynchronously)."""
    found = []
    for proc in psutil.process_iter(["uids"]):
        uids = proc.info.get("uids")
        if uids is not None and uids.real >= _UID_BASE:
            found.append(proc)
    _, alive = psutil.wait_procs(found, timeout=10)
    left = []
    for proc in alive:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.NoSuchProcess:
            pass
    return left


def test_a_plain_program_runs_in_its_own_directory_with_a_bare_environment(sandbox) -> None:
    code = "import os\nopen('made.txt', 'w').write('x')\nprint(sorted(os.environ), os.listdir('.'))"
    result = _run(sandbox, code)
    assert result.returncode == 0 and not result.timed_out
    names, listing = result.stdout.decode().strip().split("] [")
    assert set(eval(names + "]")) <= {"HOME", "LANG", "PATH", "PWD"}
    assert "made.txt" in listing and "main.py" in listing


def test_fork_bomb_is_contained_and_leaves_no_process(sandbox) -> None:
    if os.geteuid() != 0:
        pytest.skip("the process limit binds a dedicated uid, which needs root")
    code = (
        "import os\nfor _ in range(100000):\n    try:\n        os.fork()\n"
        "    except OSError:\n        pass\nprint('survived')\n"
    )
    # The wall clock ends it: each process stays under its own CPU limit.
    result = _run(sandbox, code, SandboxLimits(cpu_seconds=1, wall_seconds=3, processes=16))
    assert result.returncode != 0 or result.timed_out
    assert _sandbox_processes_left() == []


def test_infinite_loop_is_killed_by_the_cpu_limit(sandbox) -> None:
    result = _run(sandbox, "while True:\n    pass\n", SandboxLimits(cpu_seconds=1, wall_seconds=20))
    assert result.returncode != 0
    assert not result.timed_out  # the CPU limit ended it, not the wall clock


def test_sleeping_forever_is_killed_by_the_wall_clock(sandbox) -> None:
    result = _run(sandbox, "import time\ntime.sleep(3600)\n", SandboxLimits(wall_seconds=1))
    assert result.timed_out and result.returncode != 0


def test_memory_hog_fails_inside_the_limit(sandbox) -> None:
    code = "try:\n    x = bytearray(4 << 30)\nexcept MemoryError:\n    print('refused')\n"
    result = _run(sandbox, code)
    assert result.stdout.strip() == b"refused"


def test_output_flood_is_cut(sandbox) -> None:
    limits = SandboxLimits(file_size_mb=1, output_bytes=1000, cpu_seconds=5)
    result = _run(sandbox, "while True:\n    print('x' * 10000)\n", limits)
    assert result.returncode != 0 and len(result.stdout) == 1000


def test_writing_outside_its_directory_fails(sandbox, tmp_path) -> None:
    if sandbox.mode != "bwrap" and os.geteuid() != 0:
        pytest.skip(f"mode {sandbox.mode} as a normal user: the code may write what the user may")
    os.chmod(tmp_path, 0o700)
    target = tmp_path / "escaped.txt"
    code = f"open({str(target)!r}, 'w').write('escaped')\n"
    result = _run(sandbox, code)
    assert result.returncode != 0
    assert not target.exists()


def test_network_is_unreachable(sandbox) -> None:
    if sandbox.mode == "rlimits":
        pytest.skip("mode rlimits has no network isolation (documented; warned at creation)")
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    port = server.getsockname()[1]
    accepted = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            accepted.append(server.accept())

    thread = threading.Thread(target=accept)
    thread.start()
    code = (
        "import socket\ntry:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    print('connected')\n"
        "except OSError as err:\n    print('refused', type(err).__name__)\n"
    )
    result = _run(sandbox, code)
    thread.join()
    server.close()
    assert result.stdout.startswith(b"refused")
    assert accepted == []


def test_parent_environment_and_secret_files_stay_hidden(sandbox, tmp_path, monkeypatch) -> None:
    if sandbox.mode != "bwrap" and os.geteuid() != 0:
        pytest.skip(f"mode {sandbox.mode} as a normal user: the code reads what the user may")
    monkeypatch.setenv("ALIGNKIT_TEST_SECRET", "hunter2-env")
    os.chmod(tmp_path, 0o700)
    secret = tmp_path / "token"
    secret.write_text("hunter2-file")
    secret.chmod(0o600)
    code = (
        "import os\nfound = [os.environ.get('ALIGNKIT_TEST_SECRET', '')]\n"
        f"for path in ({str(secret)!r}, '/proc/{os.getpid()}/environ', '/proc/1/environ'):\n"
        "    try:\n        found.append(open(path, 'rb').read().decode(errors='replace'))\n"
        "    except OSError as err:\n        found.append(type(err).__name__)\n"
        "print(found)\n"
    )
    result = _run(sandbox, code)
    assert result.returncode == 0, result.stderr
    assert b"hunter2" not in result.stdout
