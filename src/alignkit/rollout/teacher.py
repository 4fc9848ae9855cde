"""Teacher-guided rollouts (seed 001): sample each token from a proposal between the policy and a
teacher, record the proposal's log-prob as the behaviour log-prob.

At every position the engine has the policy's and the teacher's next-token log-probs (both after
the same temperature / top-k / top-p) and samples from

- ``q_α ∝ π_θ^α · π_t^(1-α)`` with α per position from a rule: ``"kl_symmetry"`` (the default,
  ``ops.sampling.kl_symmetry_alpha``: KL(q‖π_θ) = KL(q‖π_t)), ``"snr"``
  (``ops.sampling.snr_alpha``: usually 1, i.e. on-policy, see docs/teacher-guided-sampling.md),
  a fixed float, or a schedule ``f(iteration) -> α`` (set the iteration with
  :meth:`TeacherGuidedEngine.set_iteration`);
- or ``"min_variance"``: ``ops.sampling.min_variance_proposal_logprobs`` with the teacher's
  log-ratio ``log π_t(y) - log π_θ(y)`` as the per-token score (seed 001's reward with
  π_ref = π_θ) and a floor of π_θ, the proposal that minimises the variance of the
  per-position importance-sampled gradient of that score (not in the α family).

Per-position α makes each position's proposal KL-symmetric; the sequence-level distribution is
the product of those, not the sequence-level q_α of whole responses.

The behaviour log-prob of each token is ``log q(y_t)``. The samples do not follow the policy
(``samples_from_policy = False``, the attribute the policy-gradient trainer reads): the trainer
must weight the policy loss and the KL term by the truncated importance weights ``min(π_θ/q, max_weight)``
(``ops.sampling.truncated_importance_weights``). After each ``generate`` the engine's
``last_stats`` holds ``sampling/alpha_mean`` (α rules only), ``sampling/is_weight_max`` and
``sampling/ess`` (the untruncated weights π_θ/q of the sampled tokens under the policy that
sampled, ESS as a fraction of the response tokens) and ``sampling/fallback_share`` (positions
whose two supports were disjoint, so the policy was used).

Both models decode with their own KV cache in one batch; the prompt's prefill is shared by its
samples; finished rows leave both caches. The teacher must use the same tokenizer. Greedy
decoding (temperature 0, e.g. evaluation) is the policy's alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from alignkit.errors import ConfigError
from alignkit.ops.sampling import (
    disjoint_supports,
    effective_sample_size,
    geometric_mixture_logprobs,
    kl_symmetry_alpha,
    min_variance_proposal_logprobs,
    snr_alpha,
    truncated_importance_weights,
)
from alignkit.rollout.engine import (
    Prompt,
    SamplingConfig,
    TransformersEngine,
    _draw,
    assemble_experience,
    pad_prompts,
    sampling_distribution,
    unwrap_for_generation,
)
from alignkit.rollout.experience import Experience

__all__ = [
    "ALPHA_RULES",
    "LinearAlpha",
    "TeacherGuidedEngine",
    "TeacherLogRatioReward",
    "check_same_vocabulary",
    "parse_alpha",
]

ALPHA_RULES = ("kl_symmetry", "snr", "min_variance")
AlphaSpec = str | float | Callable[[int], float]


class LinearAlpha:
    """α moving linearly from ``start`` to ``end`` over ``iterations`` iterations, then ``end``."""

    def __init__(self, start: float, end: float, iterations: int) -> None:
        if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0 and iterations >= 1):
            raise ConfigError(
                f"rollout.alpha: linear:START:END:ITERATIONS needs START and END in [0, 1] and "
                f"ITERATIONS >= 1, got {start}:{end}:{iterations}"
            )
        self.start, self.end, self.iterations = start, end, iterations

    def __call__(self, iteration: int) -> float:
        share = min(1.0, max(0, iteration) / self.iterations)
        return self.start + (self.end - self.start) * share

    def __repr__(self) -> str:
        return f"linear:{self.start:g}:{self.end:g}:{self.iterations}"


def parse_alpha(spec: str | float) -> AlphaSpec:
    """A config's ``rollout.alpha``: ``kl_symmetry`` | ``snr`` | ``min_variance`` | a number in
    [0, 1] | ``linear:START:END:ITERATIONS`` (a schedule over training iterations)."""
    if isinstance(spec, bool):
        raise ConfigError(f"rollout.alpha: expected a rule or a number, got {spec!r}")
    if isinstance(spec, int | float):
        value = float(spec)
    elif spec in ALPHA_RULES:
        return spec
    elif spec.startswith("linear:"):
        parts = spec.split(":")[1:]
        try:
            start, end, iterations = float(parts[0]), float(parts[1]), int(parts[2])
        except (ValueError, IndexError):
            raise ConfigError(
                f"rollout.alpha: {spec!r} is not linear:START:END:ITERATIONS"
            ) from None
        if len(parts) != 3:
            raise ConfigError(f"rollout.alpha: {spec!r} is not linear:START:END:ITERATIONS")
        return LinearAlpha(start, end, iterations)
    else:
        try:
            value = float(spec)
        except ValueError:
            raise ConfigError(
                f"rollout.alpha: unknown rule {spec!r}; use one of {', '.join(ALPHA_RULES)}, "
                "a number in [0, 1] or linear:START:END:ITERATIONS"
            ) from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"rollout.alpha: a fixed alpha must lie in [0, 1], got {value:g}")
    return value


def _output_width(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def check_same_vocabulary(
    tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase | None,
    model: nn.Module,
    teacher: nn.Module,
) -> int:
    """The number of logits both models share; ``ConfigError`` unless the tokenizers agree.

    Token ids must mean the same in both models: the two tokenizers' vocabularies (token ->
    id) and EOS must be equal. The models' output widths may differ (padded embedding
    matrices, e.g. Qwen2.5 7B's 152064 against 0.5B's 151936), but both must cover the
    tokenizer; the first ``min(widths)`` logits are used.
    """
    if teacher_tokenizer is not None and teacher_tokenizer is not tokenizer:
        mine, theirs = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if mine != theirs:
            only_mine = sorted(set(mine) - set(theirs))[:3]
            only_theirs = sorted(set(theirs) - set(mine))[:3]
            moved = [t for t in mine if t in theirs and mine[t] != theirs[t]][:3]
            raise ConfigError(
                "rollout.teacher: the teacher's tokenizer differs from the policy's "
                f"({len(theirs)} vs {len(mine)} tokens; only the policy's: {only_mine}, only "
                f"the teacher's: {only_theirs}, different ids: {moved}); teacher-guided "
                "sampling needs the same tokenizer"
            )
        if tokenizer.eos_token_id != teacher_tokenizer.eos_token_id:
            raise ConfigError(
                f"rollout.teacher: EOS ids differ (policy {tokenizer.eos_token_id}, "
                f"teacher {teacher_tokenizer.eos_token_id})"
            )
    widths = [_output_width(model), _output_width(teacher)]
    if None in widths:
        raise ConfigError("rollout.teacher: cannot read the models' output widths")
    width = min(widths)
    needed = len(tokenizer) if hasattr(tokenizer, "__len__") else width
    if width < needed:
        raise ConfigError(
            f"rollout.teacher: the models' output widths {widths} do not cover the tokenizer's "
            f"{needed} tokens"
        )
    return width


class TeacherGuidedEngine:
    """A ``GenerationEngine`` sampling from a policy/teacher proposal (see the module docstring).

    Args:
        model: the policy (unwrapped for generation).
        teacher: any causal LM with the same tokenizer; frozen, run in eval mode.
        tokenizer: the policy's tokenizer (pad and EOS ids).
        alpha: ``"kl_symmetry"`` | ``"snr"`` | ``"min_variance"`` | a float in [0, 1] |
            ``"linear:START:END:ITERATIONS"`` | a callable ``iteration -> α``
            (:func:`parse_alpha`; schedules read the iteration set by :meth:`set_iteration`).
        teacher_tokenizer: checked against ``tokenizer`` when given.
        floor: the policy's share in the ``"min_variance"`` proposal (weights <= 1/floor).
    """

    samples_from_policy = False
    """Its samples follow q, not the policy: importance weights are needed."""

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        alpha: AlphaSpec = "kl_symmetry",
        teacher_tokenizer: PreTrainedTokenizerBase | None = None,
        floor: float = 0.1,
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token for batched generation")
        if not callable(alpha):
            alpha = parse_alpha(alpha)
        if not 0.0 < floor <= 1.0:
            raise ConfigError(f"rollout.floor must lie in (0, 1], got {floor}")
        self.tokenizer = tokenizer
        self.model = unwrap_for_generation(model)
        self.teacher = unwrap_for_generation(teacher)
        self.width = check_same_vocabulary(tokenizer, teacher_tokenizer, self.model, self.teacher)
        self.alpha = alpha
        self.floor = floor
        self.iteration = 0
        self.last_stats: dict[str, float] = {}

    def sync_weights(self, model: nn.Module) -> None:
        """In-process: generate with ``model`` itself from now on (no copy); the teacher moves
        to the policy's device (the trainer places the policy after building the engine)."""
        self.model = unwrap_for_generation(model)
        self.teacher.to(next(self.model.parameters()).device)

    def set_iteration(self, iteration: int) -> None:
        """The training iteration a schedule ``alpha`` is evaluated at."""
        self.iteration = iteration

    def proposal(self, policy_logits: Tensor, teacher_logits: Tensor, sampling: SamplingConfig):
        """``(log q [R, V], log π_θ [R, V], alpha [R] or None, fallback [R])`` for one step's
        logits, both through ``sampling_distribution`` first."""
        policy = sampling_distribution(policy_logits, sampling)
        teacher = sampling_distribution(teacher_logits, sampling)
        fallback = disjoint_supports(policy, teacher)
        rule = self.alpha
        if rule == "min_variance":
            # The score needs both log-probs wherever π_θ > 0: take them before top-k/top-p.
            scaled_policy = (policy_logits.float() / sampling.temperature).log_softmax(-1)
            scaled_teacher = (teacher_logits.float() / sampling.temperature).log_softmax(-1)
            logq = min_variance_proposal_logprobs(
                policy, scaled_teacher - scaled_policy, floor=self.floor
            )
            return logq, policy, None, torch.zeros_like(fallback)
        if rule == "kl_symmetry":
            alpha = kl_symmetry_alpha(policy, teacher).alpha
        elif rule == "snr":
            alpha = snr_alpha(policy, teacher)[0]
        else:
            value = float(rule(self.iteration) if callable(rule) else rule)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(
                    f"rollout.alpha: the schedule gave {value} at iteration {self.iteration}"
                )
            alpha = policy.new_full(fallback.shape, value)
        alpha = torch.where(fallback, torch.ones_like(alpha), alpha)
        return geometric_mixture_logprobs(policy, teacher, alpha), policy, alpha, fallback

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingConfig,
        *,
        generator: torch.Generator,
        group_offset: int = 0,
    ) -> Experience:
        """Sample ``sampling.samples_per_prompt`` responses per prompt from the proposal."""
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        if sampling.temperature == 0:
            # Greedy decoding (evaluation) is the policy's own: there is no q to sample from.
            return TransformersEngine(self.model, self.tokenizer).generate(
                prompts, sampling, generator=generator, group_offset=group_offset
            )
        modes = self.model.training, self.teacher.training
        self.model.eval()
        self.teacher.eval()
        try:
            with torch.inference_mode():
                return self._generate(prompts, sampling, generator, group_offset)
        finally:
            self.model.train(modes[0])
            self.teacher.train(modes[1])

    def _generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingConfig,
        generator: torch.Generator,
        group_offset: int,
    ) -> Experience:
        device = next(self.model.parameters()).device
        g, steps = sampling.samples_per_prompt, sampling.max_new_tokens
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        prompt_ids, prompt_mask, positions = pad_prompts(prompts, pad, device)

        def forward(model: nn.Module, cache: Any, ids: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
            where = next(model.parameters()).device
            out = model(
                input_ids=ids.to(where),
                attention_mask=mask.to(where),
                position_ids=pos.to(where),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            return out.logits[:, -1, : self.width].to(device)

        caches = [
            DynamicCache(config=getattr(m, "config", None)) for m in (self.model, self.teacher)
        ]
        models = (self.model, self.teacher)
        logits = [
            forward(m, c, prompt_ids, prompt_mask, positions)
            for m, c in zip(models, caches, strict=True)
        ]
        if g > 1:
            for cache in caches:
                cache.batch_repeat_interleave(g)
            logits = [x.repeat_interleave(g, dim=0) for x in logits]
        n = len(prompts) * g
        mask = prompt_mask.repeat_interleave(g, dim=0)
        next_position = positions[:, -1:].repeat_interleave(g, dim=0) + 1

        tokens = torch.full((n, steps), pad, dtype=torch.long, device=device)
        behaviour = torch.zeros((n, steps), dtype=torch.float32, device=device)
        policy_logprobs = torch.zeros((n, steps), dtype=torch.float32, device=device)
        lengths = torch.zeros(n, dtype=torch.long, device=device)
        live = torch.arange(n, device=device)
        alpha_sum, positions_seen, fallbacks = 0.0, 0, 0
        for step in range(steps):
            if sampling.suppress_eos and eos is not None:
                for x in logits:
                    x[:, eos] = float("-inf")
            logq, logp, alpha, fallback = self.proposal(logits[0], logits[1], sampling)
            chosen = _draw(logq, generator)
            tokens[live, step] = chosen
            behaviour[live, step] = logq.gather(1, chosen[:, None]).squeeze(1).float()
            policy_logprobs[live, step] = logp.gather(1, chosen[:, None]).squeeze(1).float()
            lengths[live] += 1
            positions_seen += int(chosen.numel())
            fallbacks += int(fallback.sum())
            if alpha is not None:
                alpha_sum += float(alpha.sum())
            if step == steps - 1:
                break
            done = chosen == eos if eos is not None else torch.zeros_like(chosen, dtype=torch.bool)
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                for model, cache in zip(models, caches, strict=True):
                    cache.batch_select_indices(keep.to(next(model.parameters()).device))
                live, chosen, mask = live[keep], chosen[keep], mask[keep]
                next_position = next_position[keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            logits = [
                forward(m, c, chosen[:, None], mask, next_position)
                for m, c in zip(models, caches, strict=True)
            ]
            next_position = next_position + 1

        response_mask = torch.arange(steps, device=device)[None, :] < lengths[:, None]
        # pi_theta / q of every sampled token (log-ratio clamped at 20 as in the trainer's weights)
        weights = truncated_importance_weights(
            policy_logprobs, behaviour, max_weight=math.exp(20)
        ).masked_fill(~response_mask, 0)
        count = int(response_mask.sum())
        self.last_stats = {
            "sampling/is_weight_max": float(weights.max()),
            "sampling/ess": float(effective_sample_size(weights, response_mask)) / max(count, 1),
            "sampling/fallback_share": fallbacks / max(positions_seen, 1),
        }
        if self.alpha != "min_variance":
            self.last_stats["sampling/alpha_mean"] = alpha_sum / max(positions_seen, 1)
        return assemble_experience(
            prompts,
            self.tokenizer,
            prompt_ids,
            prompt_mask,
            tokens,
            behaviour,
            lengths,
            sampling,
            group_offset,
        )


class TeacherLogRatioReward:
    """Seed 001's reward ``r = log π_t(c | p) - log π_ref(c | p)``, summed over the completion.

    A ``RewardSource``: called with texts, it tokenises ``prompt + completion + EOS`` exactly as
    ``ModelReward`` does (the policy's tokenizer, shared by teacher and reference) and scores
    both models in batches of ``batch_size``. Decoded text need not re-tokenise to the sampled
    ids; :meth:`score_experience` scores the sampled token ids themselves (use it when the
    ``Experience`` is at hand). Positive where the teacher likes the completion more than the
    reference does.
    """

    name = "teacher_log_ratio"

    def __init__(
        self,
        teacher: nn.Module,
        reference: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
    ) -> None:
        check_same_vocabulary(tokenizer, None, teacher, reference)
        self.teacher, self.reference, self.tokenizer = teacher, reference, tokenizer
        self.batch_size = batch_size
        self.max_length = max_length

    def _log_ratio(self, batch: dict[str, Tensor]) -> Tensor:
        from alignkit.models.forward import response_logps

        scores = []
        for model in (self.teacher, self.reference):
            device = next(model.parameters()).device
            on_device = {key: value.to(device) for key, value in batch.items()}
            scores.append(response_logps(model, on_device).float().cpu())
        return scores[0] - scores[1]

    @torch.inference_mode()
    def __call__(
        self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]
    ) -> Tensor:
        from alignkit.data.collate import SFTCollator
        from alignkit.data.tokenize import tokenize_sft

        records = [
            {"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)
        ]
        examples = tokenize_sft(records, self.tokenizer, max_length=self.max_length)
        collate = SFTCollator(pad_token_id=self.tokenizer.pad_token_id)
        out = []
        for start in range(0, len(examples), self.batch_size):
            batch = collate(examples[start : start + self.batch_size])
            out.append(
                self._log_ratio(
                    {
                        "input_ids": batch["input_ids"],
                        "attention_mask": batch["attention_mask"],
                        "response_mask": batch["labels"] != -100,
                    }
                )
            )
        return torch.cat(out)

    @torch.inference_mode()
    def score_experience(self, experience: Experience) -> Tensor:
        """``[N]`` rewards of the sampled ids (prompt and response as generated)."""
        out = []
        for part in experience.split(self.batch_size):
            out.append(
                self._log_ratio(
                    {
                        "input_ids": part.input_ids,
                        "attention_mask": part.attention_mask,
                        "response_mask": part.response_mask,
                    }
                )
            )
        return torch.cat(out)
