"""Generation speed: alignkit's TransformersEngine against transformers' `model.generate()`.

    PYTHONPATH=src .venv/bin/python bench/generation.py [--model tiny] [--repeats 5] [--cases 3]
        [--teacher tiny] [--alpha kl_symmetry] [--cpu-time]

Same model, same prompts x samples in one batch, same max_new_tokens, temperature 1, top-k 0,
top-p 1, fp32, one thread. `generate()` gets the prompts repeated `samples` times (TRL's GRPO
layout) and `use_cache=True`. Each case runs with EOS suppressed on both sides (every row
generates exactly max_new_tokens, so tokens/s compares the per-token cost) and, for a model
that emits EOS (e.g. an SFT checkpoint: `--model runs/sft-reverse/checkpoints/step-285/model
--prompts data/reverse_heldout.jsonl`), with EOS allowed (finished rows: the engine drops
them, `generate()` keeps feeding them pad tokens). Timings are medians over repeats after one
warm-up call, the backends alternating. ``--teacher MODEL`` adds ``TeacherGuidedEngine`` (the
policy and that teacher, α by ``--alpha``, KL symmetry by default; ``tiny`` is the tiny preset
initialised with another seed); ``--cases N`` runs the first N cases only (``--cases 1``: the
quickest); ``--cpu-time`` times by process CPU time instead of wall time (one thread: the same
on a quiet machine, much steadier on a shared one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from alignkit.data.collate import PromptCollator
from alignkit.data.synthetic import SyntheticTask
from alignkit.models import load_policy
from alignkit.rollout import (
    SamplingConfig,
    TeacherGuidedEngine,
    TransformersEngine,
    load_prompt_file,
    prompts_from_records,
)

CASES = [  # (prompts, samples per prompt, max new tokens)
    (4, 8, 32),
    (16, 8, 32),
    (64, 8, 16),
]


def _engine_run(engine, prompts, sampling, seed):
    exp = engine.generate(prompts, sampling, generator=torch.Generator().manual_seed(seed))
    return int(exp.response_lengths.sum())


def _hf_run(model, tokenizer, prompts, sampling, seed):
    ids = [p.input_ids for p in prompts for _ in range(sampling.samples_per_prompt)]
    batch = PromptCollator(pad_token_id=tokenizer.pad_token_id)([{"input_ids": i} for i in ids])
    extra = {"suppress_tokens": [tokenizer.eos_token_id]} if sampling.suppress_eos else {}
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=sampling.max_new_tokens,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
            **extra,
        )
    new = out[:, batch["input_ids"].shape[1] :]
    # generated tokens up to and including the first EOS
    is_eos = new == tokenizer.eos_token_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, new.shape[1])
    return int(first.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prompts", default=None, help="prompt file (default: synthetic task)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", type=int, default=len(CASES), help="run the first N cases")
    parser.add_argument("--teacher", default=None, help="also time TeacherGuidedEngine")
    parser.add_argument("--alpha", default="kl_symmetry", help="the teacher engine's rollout.alpha")
    parser.add_argument(
        "--cpu-time", action="store_true", help="time by process CPU time (steadier when shared)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    clock = time.process_time if args.cpu_time else time.perf_counter
    model, tokenizer = load_policy(args.model)
    model.eval()
    if args.prompts:
        pool = load_prompt_file(args.prompts, tokenizer)
    else:
        records = [{"prompt": p} for p in SyntheticTask(seed=0).prompts("heldout")]
        pool = prompts_from_records(records, tokenizer)
    engine = TransformersEngine(model, tokenizer)
    teacher = None
    if args.teacher:
        other, _ = load_policy(args.teacher, seed=1)  # the seed only matters for tiny
        teacher = TeacherGuidedEngine(model, other.eval(), tokenizer, alpha=args.alpha)
    print(f"model {args.model}, torch threads {torch.get_num_threads()}, repeats {args.repeats}")
    header = (
        f"{'prompts x G':>11} {'new':>4} {'eos':>5} | {'engine s/batch':>14} {'tok/s':>8} | "
        f"{'generate() s/batch':>18} {'tok/s':>8} | {'speed-up':>8}"
    )
    if teacher is not None:
        header += f" | {'teacher s/batch':>15} {'tok/s':>8}"
    print(header)
    print("-" * len(header))
    for n_prompts, samples, new_tokens in CASES[: args.cases]:
        prompts = pool[:n_prompts]
        for suppress in (True, False):
            sampling = SamplingConfig(
                max_new_tokens=new_tokens, samples_per_prompt=samples, suppress_eos=suppress
            )
            runs = {
                "engine": lambda s, p=prompts, c=sampling: _engine_run(engine, p, c, s),
                "hf": lambda s, p=prompts, c=sampling: _hf_run(model, tokenizer, p, c, s),
            }
            if teacher is not None:
                runs["teacher"] = lambda s, p=prompts, c=sampling: _engine_run(teacher, p, c, s)
            times: dict[str, list[float]] = {name: [] for name in runs}
            tokens: dict[str, list[int]] = {name: [] for name in runs}
            for run in runs.values():
                run(0)  # warm-up
            for repeat in range(args.repeats):
                order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
                for name in order:
                    start = clock()
                    tokens[name].append(runs[name](repeat))
                    times[name].append(clock() - start)
            med = {name: statistics.median(times[name]) for name in runs}
            rate = {name: statistics.median(tokens[name]) / med[name] for name in runs}
            line = (
                f"{n_prompts:>5} x {samples:<3} {new_tokens:>4} {'off' if suppress else 'on':>5} | "
                f"{med['engine']:>14.4f} {rate['engine']:>8.0f} | {med['hf']:>18.4f} "
                f"{rate['hf']:>8.0f} | {med['hf'] / med['engine']:>7.2f}x"
            )
            if teacher is not None:
                line += f" | {med['teacher']:>15.4f} {rate['teacher']:>8.0f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
