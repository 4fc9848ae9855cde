"""Generation backends, experience batches and reward sources for rollouts and evaluation."""

from alignkit.rollout.engine import (
    GenerationEngine,
    Prompt,
    SamplingConfig,
    TransformersEngine,
    load_prompt_file,
    prompts_from_records,
)
from alignkit.rollout.experience import Experience
from alignkit.rollout.generate import GenerationSettings, generate_responses

__all__ = [
    "Experience",
    "GenerationEngine",
    "GenerationSettings",
    "Prompt",
    "SamplingConfig",
    "TransformersEngine",
    "generate_responses",
    "load_prompt_file",
    "prompts_from_records",
]
