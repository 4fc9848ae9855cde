"""retain_freed_memory: freed heap memory is reused without page faults."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from alignkit.runloop import allocator
from alignkit.runloop.allocator import retain_freed_memory

# Rounds of allocating blocks (40 of 8 MiB, or 4 of 80 MiB: above glibc's largest mmap
# threshold, as an LM head's logits), writing them and freeing them all; prints the page faults
# of the last of 5 rounds. glibc's default trims the freed heap top back to the kernel after each
# round and unmaps large blocks, so a round usually faults its 320 MiB in again (~80k faults).
# Kept, the heap settles within 3 rounds: the 80 MiB blocks fault one block in again in round 2
# or 3 (measured over 12 processes), then nothing.
# A block is taken as torch's CPU allocator takes a tensor's memory (c10::alloc_cpu:
# posix_memalign, 64-byte aligned) and written whole, in a process that imports neither torch
# nor alignkit's run machinery (the allocator module is loaded from its file): the same glibc
# calls at a sixth of the start-up (measured with torch tensors: the same kept counts, 0).
ROUNDS = textwrap.dedent(
    """
    import ctypes, importlib.util, resource, sys
    spec = importlib.util.spec_from_file_location("allocator", sys.argv[1])
    allocator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(allocator)
    if sys.argv[2] == "retain":
        assert allocator.retain_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.free.argtypes = [ctypes.c_void_p]
    count, size = int(sys.argv[3]), int(sys.argv[4])
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [ctypes.c_void_p() for _ in range(count)]
        for block in blocks:
            assert libc.posix_memalign(ctypes.byref(block), 64, ctypes.c_size_t(size)) == 0
            ctypes.memset(block, 1, size)
        for block in blocks:
            libc.free(block)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(faults)
    """
)


def last_round_faults(*processes: tuple[str, int, int]) -> list[int]:
    """The last round's faults of each (mode, count, bytes), each in a fresh process (its own
    address layout); the processes run at the same time."""
    started = [
        subprocess.Popen(
            [sys.executable, "-c", ROUNDS, allocator.__file__, *map(str, process)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for process in processes
    ]
    faults = []
    for process in started:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        faults.append(int(out.split()[-1]))
    return faults


EIGHT_MIB_BLOCKS = (40, 8 << 20)  # (count, bytes)
EIGHTY_MIB_BLOCKS = (4, 80 << 20)


@pytest.mark.skipif(not retain_freed_memory(), reason="needs Linux with glibc")
def test_freed_memory_is_reused_without_page_faults():
    # 320 MiB is 81,920 pages. Kept: measured 0, or 2,049 (one 8 MiB block). glibc's default
    # usually faults all of them in again (81,890), but not in every process (its dynamic
    # thresholds depend on the address layout), so only the kept case is asserted, in 3
    # processes.
    for kept in last_round_faults(*[("retain", *EIGHT_MIB_BLOCKS)] * 3):
        assert kept < 8000, kept


@pytest.mark.skipif(not retain_freed_memory(), reason="needs Linux with glibc")
def test_blocks_above_the_mmap_threshold_are_reused_too():
    # 4 blocks of 80 MiB: glibc maps each one above 32 MiB afresh (81,920 faults a round).
    kept, default = last_round_faults(
        ("retain", *EIGHTY_MIB_BLOCKS), ("default", *EIGHTY_MIB_BLOCKS)
    )
    assert kept < 8000, kept
    assert default > 40_000


@pytest.mark.parametrize("setting", [True, False])
def test_a_cpu_run_applies_it_unless_configured_off(
    task_files, run_settings, tmp_path, monkeypatch, setting
):
    from alignkit.config import load_config
    from alignkit.runloop import run
    from alignkit.trainers.sft import SFTConfig, build_sft_trainer

    calls = []
    monkeypatch.setattr(run, "retain_freed_memory", lambda: calls.append(True) or True)
    config = load_config(
        SFTConfig,
        None,
        run_settings(
            tmp_path,
            "alloc",
            f"data.train_file={task_files['sft_train']}",
            "max_steps=1",
            f"retain_freed_memory={str(setting).lower()}",
        ),
    )
    build_sft_trainer(config).train()
    assert calls == ([True] if setting else [])
