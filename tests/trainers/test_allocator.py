"""retain_freed_memory: freed heap memory is reused without page faults."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from alignkit.runloop.allocator import retain_freed_memory

# Rounds of allocating blocks (40 of 8 MiB, or 4 of 80 MiB: above glibc's largest mmap
# threshold, as an LM head's logits), writing them and freeing them all; prints the page faults
# of the last of 5 rounds. glibc's default trims the freed heap top back to the kernel after each
# round and unmaps large blocks, so a round usually faults its 320 MiB in again (~80k faults).
# Kept, the heap settles within 3 rounds: the 80 MiB blocks fault one block in again in round 2
# or 3 (measured over 12 processes), then nothing.
ROUNDS = textwrap.dedent(
    """
    import resource, sys
    import torch
    from alignkit.runloop.allocator import retain_freed_memory
    if sys.argv[1] == "retain":
        assert retain_freed_memory()
    count, elements = int(sys.argv[2]), int(sys.argv[3])
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [torch.ones(elements) for _ in range(count)]
        del blocks
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(faults)
    """
)


def last_round_faults(mode: str, count: int = 40, elements: int = 2 << 20) -> int:
    done = subprocess.run(
        [sys.executable, "-c", ROUNDS, mode, str(count), str(elements)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not retain_freed_memory(), reason="needs Linux with glibc")
def test_freed_memory_is_reused_without_page_faults():
    # 320 MiB is 81,920 pages. Kept: measured 0, or 2,049 (one 8 MiB block). glibc's default
    # usually faults all of them in again (81,890), but not in every process (its dynamic
    # thresholds depend on the address layout), so only the kept case is asserted.
    for _ in range(3):
        kept = last_round_faults("retain")
        assert kept < 8000, kept


@pytest.mark.skipif(not retain_freed_memory(), reason="needs Linux with glibc")
def test_blocks_above_the_mmap_threshold_are_reused_too():
    # 4 blocks of 80 MiB: glibc maps each one above 32 MiB afresh (81,920 faults a round).
    kept = last_round_faults("retain", count=4, elements=20 << 20)
    assert kept < 8000, kept
    assert last_round_faults("default", count=4, elements=20 << 20) > 40_000


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
