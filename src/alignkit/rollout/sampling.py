"""``SamplingConfig``: how an engine samples, the one description shared by every caller (the
online trainers map their ``rollout`` settings onto it, evaluation and the CLI build it)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SamplingConfig"]


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample. ``temperature == 0`` is greedy decoding (recorded log-probs are 0: the
    greedy distribution is a point mass). ``top_k == 0`` and ``top_p == 1`` switch those off.
    ``suppress_eos`` forbids EOS (every row runs to ``max_new_tokens``; for benchmarks; the
    recorded log-probs are then under the EOS-masked distribution)."""

    max_new_tokens: int
    samples_per_prompt: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    suppress_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """Greedy decoding: the argmax of the policy's logits, no distribution sampled."""
        return self.temperature == 0

    @property
    def plain_softmax(self) -> bool:
        """Tokens are drawn from ``softmax(logits / T)`` itself, the distribution a trainer scores
        at temperature T: not greedy, no top-k / top-p truncation, EOS not suppressed."""
        return not self.greedy and self.top_k == 0 and self.top_p == 1.0 and not self.suppress_eos
