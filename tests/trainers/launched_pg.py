"""The two-process policy-gradient runs of test_pg.py and test_dynamic_sampling.py, made by one
``accelerate launch`` of this script per test file.

``launched_pg.py JOBS`` trains the runs that JOBS lists (JSON), one after the other in the same
processes: ``[{"method": "grpo", "recorder": "batches", "args": [...]}, ...]``. Each run
samples every prompt with a generator seeded by its group id, so 1 or 2 processes draw the same
sequences, and records what its test compares (:data:`RECORDERS`). The tests run the
one-process references with :func:`train` in their own process.
"""

from __future__ import annotations

import json
import sys

import torch
from launch_helpers import end_launched_process

from alignkit.config import load_config
from alignkit.ops import informative_groups
from alignkit.rollout import Experience, TransformersEngine
from alignkit.trainers.pg import PolicyGradientTrainer, build_pg_trainer
from alignkit.trainers.registry import get_method
from alignkit.trainers.rl_config import PGConfig


class PerPromptEngine(TransformersEngine):
    """Each prompt sampled with a generator seeded by its group id: the same sequences
    whichever process draws them."""

    def generate(self, prompts, sampling, *, generator, group_offset=0):
        parts = []
        for i, prompt in enumerate(prompts):
            seeded = torch.Generator().manual_seed(group_offset + i)
            parts.append(
                super().generate(
                    [prompt], sampling, generator=seeded, group_offset=group_offset + i
                )
            )
        return Experience.cat(parts)


class AdvantageRecording(PolicyGradientTrainer):
    """Writes ``advantages-<process>.json``: each sequence's response advantages, keyed by
    "<group>-<sample in the group>"."""

    def make_experience(self, prompts, group_offset, generator):
        exp = super().make_experience(prompts, group_offset, generator)
        rows, seen = {}, {}
        for i, group in enumerate(exp.group_index.tolist()):
            seen[group] = seen.get(group, -1) + 1
            rows[f"{group}-{seen[group]}"] = exp.advantages[i][exp.response_mask[i]].tolist()
        path = self.run_dir.root / f"advantages-{self.accelerator.process_index}.json"
        path.write_text(json.dumps(rows))
        return exp


class BatchRecording(PolicyGradientTrainer):
    """Writes ``batch-<iteration>-<process>.json``: the groups of the process' batch, the
    informative ones among them and the rollout counts (dynamic sampling's rounds)."""

    def collect_experience(self, iteration):
        exp, counts = super().collect_experience(iteration)
        keep = informative_groups(exp.scores, exp.group_index)
        record = {
            "groups": exp.group_index.unique().numel(),
            "informative": exp.group_index[keep].unique().numel(),
            **counts,
        }
        path = self.run_dir.root / f"batch-{iteration}-{self.accelerator.process_index}.json"
        path.write_text(json.dumps(record))
        return exp, counts


RECORDERS = {"advantages": AdvantageRecording, "batches": BatchRecording}


def train(method: str, recorder: str, args: list[str]) -> None:
    """One run of `method` (its defaults, then `args`) with the trainer that `recorder` names."""
    cfg = load_config(PGConfig, None, [*get_method(method).defaults, *args])
    built = build_pg_trainer(cfg)
    model, tokenizer = built.unwrapped_model, built.tokenizer
    torch.manual_seed(0)
    trainer = RECORDERS[recorder](
        cfg, model, tokenizer, built.prompts, built.reward, engine=PerPromptEngine(model, tokenizer)
    )
    trainer.train()


if __name__ == "__main__":
    for job in json.loads(sys.argv[1]):
        train(**job)
    end_launched_process()
