"""Generation backends and reward sources for rollouts and evaluation."""

from alignkit.rollout.generate import GenerationSettings, generate_responses

__all__ = ["GenerationSettings", "generate_responses"]
