"""Per-phase time of one DPO training step on SmolLM2-135M-Instruct (the ``dpo-small`` set-up).

    python bench/dpo_small_profile.py [--steps 3] [--modes padded,unshared,masked,blocks,tied]

Modes, measured in this order on one model in one process (one torch thread, fp32):
``padded`` (the padded forward), ``unshared`` (packed rows with a block-diagonal mask, each row
its own sequence), ``masked`` (packed rows with a tree mask, a pair's prompt computed once),
``blocks`` (one packed row, attention row by row: `models.block_attention`), ``tied`` (blocks,
and the tied embedding's gradient accumulated in place: `models.tied`, installed from then on). For each, runs ``--steps`` of the
policy side of alignkit's DPO step on the bench's pairs in file order (batch ``i`` = pairs
``4i .. 4i+3``), timing: ``forward`` (token log-probs of the chosen and rejected rows),
``loss+backward``, ``optimizer`` (fused AdamW step with grad clipping) and ``zero_grad``. The first
step of each mode is left out (allocator warm-up). Prints median CPU seconds
(``process_time``, robust to busy neighbours) per phase and the
real/padded/packed token counts. Needs ``alignkit models fetch smollm2-135m-instruct``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", default="padded,unshared,masked,blocks,tied")
    parser.add_argument("--pairs-per-step", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(BENCH_DIR))
    from dpo_small import small_pairs

    from alignkit.data import PreferenceCollator, tokenize_preferences
    from alignkit.models import forward as forward_module
    from alignkit.models import load_policy
    from alignkit.models.block_attention import block_attention_available
    from alignkit.models.forward import response_logps
    from alignkit.models.packing import model as packing_module
    from alignkit.models.packing import pack_rows
    from alignkit.models.tied import accumulate_tied_embedding_grad
    from alignkit.ops.preference import dpo_loss

    model, tokenizer = load_policy("smollm2-135m-instruct", dtype="float32")
    model.train()
    pairs, _ = small_pairs(args.pairs_per_step * (args.steps + 1))
    data = tokenize_preferences(pairs, tokenizer, args.max_length, "truncate", extra_fields=[])
    collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    n = args.pairs_per_step
    batches = [collate([data[i * n + j] for j in range(n)]) for i in range(args.steps + 1)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)  # as the trainer
    for mode in args.modes.split(","):
        share = mode != "unshared"
        forward_module.pack_rows = functools.partial(pack_rows, share_prefixes=share)
        masks = mode in ("unshared", "masked")
        packing_module.block_attention_available = (
            (lambda model: False) if masks else block_attention_available
        )
        if mode == "tied":
            accumulate_tied_embedding_grad(model)
        phases: dict[str, list[float]] = {}
        for step, batch in enumerate(batches):
            times = [time.process_time()]
            logps = response_logps(model, batch, packed=mode != "padded")
            times.append(time.process_time())
            chosen, rejected = logps.chunk(2)
            loss = dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), beta=0.1)[0]
            loss.mean().backward()
            times.append(time.process_time())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            times.append(time.process_time())
            optimizer.zero_grad(set_to_none=True)
            times.append(time.process_time())
            if step == 0:
                continue
            names = ("forward", "loss+backward", "optimizer", "zero_grad")
            for name, t0, t1 in zip(names, times, times[1:], strict=False):
                phases.setdefault(name, []).append(t1 - t0)
        total = sum(statistics.median(v) for v in phases.values())
        cells = "  ".join(f"{k} {statistics.median(v):.3f}" for k, v in phases.items())
        print(f"{mode:<8} s/step {total:.3f}  {cells}", flush=True)
    batch = batches[1]
    layout = pack_rows(
        batch["input_ids"], batch["attention_mask"], **packing_module.packing_options(model)
    )
    print(
        f"tokens of step 2: real {int(batch['attention_mask'].sum())}, padded "
        f"{batch['input_ids'].numel()}, packed {layout.packed_tokens if layout else '-'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
