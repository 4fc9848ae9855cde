"""What running the LM head only on scored rows saves: one DPO forward + backward, both ways.

    python bench/lm_head_rows.py [--model tiny|smollm2-135m-instruct] [--pairs 8] [--repeats 5]

Builds one batch of preference pairs from the bundled synthetic task with the model's own
tokenizer (chat template included), then times `response_logps` forward + backward with the
LM head on the positions that predict a response token (`logits_to_keep` mask, the default)
and on every position (the fallback for models outside transformers). Prints the median time,
the logit rows each computes, and the largest difference between their log-probs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

from alignkit.data import PreferenceCollator, tokenize_preferences
from alignkit.data.loaders import RecordSet
from alignkit.data.synthetic import SyntheticTask
from alignkit.models import forward, load_policy
from alignkit.ops.logprobs import predicts_scored_mask


def one_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    logps = forward.response_logps(model, batch)
    logps.sum().backward()
    return time.perf_counter() - started, logps.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_policy(args.model, seed=0)
    model.train()
    rows = SyntheticTask(seed=0).preference_rows("train")[: args.pairs]
    records = RecordSet(rows, list(range(1, len(rows) + 1)), "synthetic", "preference")
    pairs = tokenize_preferences(records, tokenizer, args.max_length, "truncate", extra_fields=[])
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(list(pairs))
    scored = int(predicts_scored_mask(batch["response_mask"]).sum())
    all_rows = batch["input_ids"].numel()

    results = {}
    for name, selects in (("scored rows", True), ("all rows", False)):
        with mock.patch.object(forward, "selects_logit_rows", lambda m, s=selects: s):
            one_step(model, batch)  # warm-up
            times, logps = [], None
            for _ in range(args.repeats):
                seconds, logps = one_step(model, batch)
                times.append(seconds)
        results[name] = (statistics.median(times), min(times), max(times), logps)

    vocab = model.config.vocab_size
    print(
        f"model {args.model} (vocabulary {vocab}), {args.pairs} pairs = {all_rows} positions, "
        f"{scored} of them predict a response token; torch threads {torch.get_num_threads()}"
    )
    print(f"{'LM head on':<12} {'logit rows':>10} {'fwd+bwd s (median [min-max])':>30}")
    for name, (median, low, high, _) in results.items():
        rows_used = scored if name == "scored rows" else all_rows
        print(f"{name:<12} {rows_used:>10} {median:>14.3f} [{low:.3f}-{high:.3f}]")
    speedup = results["all rows"][0] / results["scored rows"][0]
    diff = (results["scored rows"][3] - results["all rows"][3]).abs().max().item()
    print(f"speed-up x{speedup:.2f}; max |log-prob difference| {diff:.2e}")


if __name__ == "__main__":
    main()
