"""The policy-gradient trainer reads what an engine declares, and nothing else: an engine with its
own copy of the weights (what a vLLM server is) gets every update before it generates, and its
log-probs never stand for the trainer's."""

from __future__ import annotations

import copy

import pytest
import torch

from alignkit.config import load_config
from alignkit.data.synthetic import write_verifiable_tasks
from alignkit.rollout import TransformersEngine
from alignkit.rollout.engine import unwrap_for_generation
from alignkit.trainers.pg import build_pg_trainer
from alignkit.trainers.registry import get_method
from alignkit.trainers.rl_config import PGConfig


class CopyingEngine(TransformersEngine):
    """Generates with a private copy of the policy, refreshed only by ``sync_weights``."""

    logprobs_match_trainer = False

    def __init__(self, trainer, *, needs_weight_sync: bool) -> None:
        super().__init__(copy.deepcopy(trainer.unwrapped_model), trainer.tokenizer)
        self.trainer, self.needs_weight_sync = trainer, needs_weight_sync
        self.generated_with_current_weights: list[bool] = []

    def sync_weights(self, model) -> None:
        self.model.load_state_dict(unwrap_for_generation(model).state_dict())

    def generate(self, prompts, sampling, *, generator, group_offset=0):
        current = self.trainer.unwrapped_model.state_dict()
        self.generated_with_current_weights.append(
            all(torch.equal(v, current[k]) for k, v in self.model.state_dict().items())
        )
        return super().generate(prompts, sampling, generator=generator, group_offset=group_offset)


def _trainer(tmp_path, name: str):
    paths = write_verifiable_tasks(tmp_path / "data")
    reward = tmp_path / "length.py"  # varies within every group, so every update moves weights
    reward.write_text(
        "def length(prompts, completions, **_):\n    return [len(c) / 10 for c in completions]\n"
    )
    overrides = (
        f"output_dir={tmp_path}",
        f"run_name={name}",
        "model.name=tiny",
        f"data.train_file={paths['sort_prompts']}",
        f"data.eval_file={paths['sort_heldout']}",
        "data.max_eval_prompts=4",
        "data.max_prompt_length=32",
        f"rewards=[{{function: {reward}:length}}]",
        "rollout.prompts_per_iteration=4",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=5",
        "train.iterations=3",
        "train.sequences_per_device=16",
        "eval.every=1",
        "optim.lr=1e-2",
        "logging.progress_bar=false",
        "logging.plots=false",
    )
    cfg = load_config(PGConfig, None, [*get_method("grpo").defaults, *overrides])
    return build_pg_trainer(cfg)


@pytest.mark.parametrize("declared", [True, False])
def test_an_engine_with_its_own_weights_is_synced_when_it_says_so(tmp_path, declared):
    trainer = _trainer(tmp_path, f"copy_{declared}")
    trainer.engine = engine = CopyingEngine(trainer, needs_weight_sync=declared)
    # It samples the policy, but its log-probs are not the trainer's: re-scored and weighed.
    assert trainer.engine_samples_policy and trainer.exactly_on_policy
    assert not trainer.behaviour_is_old_policy and trainer.corrects_behaviour
    experiences = []
    make_experience = trainer.make_experience

    def watched(*args):
        experiences.append(make_experience(*args))
        return experiences[-1]

    trainer.make_experience = watched
    trainer.train()
    assert len(experiences) == 3
    gaps = []
    for exp in experiences:
        assert exp.old_logprobs is not exp.behaviour_logprobs
        gaps.append(float((exp.is_weights - 1)[exp.response_mask].abs().max()))
    # Initial evaluation, then per iteration: a rollout and an evaluation.
    assert len(engine.generated_with_current_weights) == 1 + 2 * 3
    if declared:
        assert all(engine.generated_with_current_weights)
        assert max(gaps) < 1e-4  # the same weights, the same arithmetic: weights of 1
    else:  # the trainer pushes nothing unasked: after the first update the copy is stale
        assert engine.generated_with_current_weights[:2] == [True, True]
        assert not any(engine.generated_with_current_weights[2:])
        # ... and the correction sees it: the stale copy's samples are weighed away from 1.
        assert gaps[0] < 1e-4 and min(gaps[1:]) > 1e-3
