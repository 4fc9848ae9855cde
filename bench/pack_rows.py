"""Time `pack_rows` (the layout of a packed batch) on the rm-tiny benchmark's batches.

    python bench/pack_rows.py [--batches 60] [--repeats 20] [--pairs 8] [--baseline FILE]

The batches are those of ``compare_trl.py rm-tiny`` (bench/train_cases.py): the synthetic
task's preference rows, tokenised by the ``tiny`` preset at max length 128, ``--pairs`` pairs
per batch (chosen then rejected rows, right-padded), in file order. ``pack_rows`` runs with the
tiny reward backbone's own :func:`~alignkit.models.packing.packing_options`, as
``RewardModel(packed=True)`` calls it. Prints the median over repeats of the mean time per
batch, and a digest of the layouts so that two versions of the code can be checked to give the
same ones.

``--baseline FILE`` also loads ``pack_rows`` from another version of the module (for example
``git show HEAD~1:src/alignkit/models/packing/layout.py > /tmp/old.py``), checks that it gives
the same layouts, and alternates the two in this process, timing each by process CPU time:
the fairest comparison on a machine with busy neighbours.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from alignkit.data import PreferenceCollator, tokenize_preferences
from alignkit.data.synthetic import SyntheticTask
from alignkit.models.packing import pack_rows, packing_options
from alignkit.models.reward import load_reward_model


def layout_digest(layouts: list) -> str:
    """A hash of every tensor and count of the layouts (None for a batch left unpacked)."""
    digest = hashlib.sha256()
    for layout in layouts:
        if layout is None:
            digest.update(b"none")
            continue
        for name in ("input_ids", "position_ids", "visible", "where", "scored_at", "segment_start"):
            value = getattr(layout, name)
            digest.update(name.encode() + (b"-" if value is None else value.numpy().tobytes()))
        digest.update(f"{layout.padded_tokens},{layout.packed_tokens}".encode())
        for block in layout.blocks or ():
            digest.update(f"{block.start},{block.end}".encode())
            for value in (block.keys, block.visible):
                digest.update(b"-" if value is None else value.numpy().tobytes())
    return digest.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--baseline", type=Path, default=None, help="another version's module")
    args = parser.parse_args()
    torch.set_num_threads(1)

    model, tokenizer = load_reward_model("tiny", dtype="float32", seed=0)
    options = packing_options(model.backbone)
    rows = SyntheticTask(seed=0).preference_rows("train")
    data = tokenize_preferences(rows, tokenizer, 128, "truncate")
    collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    n = args.pairs
    batches = [collate([data[i * n + j] for j in range(n)]) for i in range(len(data) // n)]
    batches = batches[: args.batches]

    def one_pass(pack: Callable = pack_rows, clock: Callable = time.perf_counter):
        layouts = []
        started = clock()
        for batch in batches:
            layouts.append(pack(batch["input_ids"], batch["attention_mask"], **options))
        return (clock() - started) / len(batches), layouts

    one_pass()  # warm-up
    times = [one_pass()[0] for _ in range(args.repeats)]
    _, layouts = one_pass()
    packed = sum(layout is not None for layout in layouts)
    print(
        f"pack_rows on {len(batches)} rm-tiny batches of {n} pairs ({packed} packed, "
        f"options {', '.join(f'{k}={v:.3g}' for k, v in options.items())}): "
        f"median {1e3 * statistics.median(times):.3f} ms per batch "
        f"[{1e3 * min(times):.3f}-{1e3 * max(times):.3f}] over {args.repeats} passes; "
        f"layouts {layout_digest(layouts)}"
    )
    if args.baseline is None:
        return
    spec = importlib.util.spec_from_file_location("baseline_packing", args.baseline)
    baseline = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = baseline  # dataclasses look their module up while the class is made
    spec.loader.exec_module(baseline)
    if layout_digest(one_pass(baseline.pack_rows)[1]) != layout_digest(layouts):
        raise SystemExit(f"{args.baseline} gives other layouts")
    cpu = {"baseline": [], "this": []}
    for i in range(args.repeats):
        pair = (("baseline", baseline.pack_rows), ("this", pack_rows))
        for name, pack in pair if i % 2 else pair[::-1]:
            cpu[name].append(one_pass(pack, time.process_time)[0])
    print(
        "same layouts; CPU ms per batch, alternating: "
        + ", ".join(f"{k} median {1e3 * statistics.median(v):.3f}" for k, v in cpu.items())
    )


if __name__ == "__main__":
    main()
