"""Rollouts: prompts, the engine contract and the one decode loop, proposals, the generation
front-end, experience batches and reward sources."""

from alignkit.rollout.engine import GenerationEngine, SnapshotEngine, TransformersEngine
from alignkit.rollout.experience import Experience
from alignkit.rollout.generate import (
    completion_rows,
    generate_batched,
    generate_responses,
    write_completions,
)
from alignkit.rollout.prompts import Prompt, load_prompt_file, prompts_from_records
from alignkit.rollout.proposals import PolicyProposal, Proposal, TeacherMixture
from alignkit.rollout.sampling import SamplingConfig
from alignkit.rollout.teacher import TeacherGuidedEngine

__all__ = [
    "Experience",
    "GenerationEngine",
    "PolicyProposal",
    "Prompt",
    "Proposal",
    "SamplingConfig",
    "SnapshotEngine",
    "TeacherGuidedEngine",
    "TeacherMixture",
    "TransformersEngine",
    "completion_rows",
    "generate_batched",
    "generate_responses",
    "load_prompt_file",
    "prompts_from_records",
    "write_completions",
]
