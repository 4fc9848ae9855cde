"""TeacherGuidedEngine: q_α's samples, recorded log q, importance-weighted gradients, checks."""

from __future__ import annotations

import pytest
import torch
from rollout_helpers import TinyVocabTokenizer, chi_square_pvalue, tiny_llama

from alignkit.errors import ConfigError
from alignkit.ops import (
    effective_sample_size,
    geometric_mixture_logprobs,
    kl_symmetry_alpha,
    min_variance_proposal_logprobs,
    sequence_logprobs,
    truncated_importance_weights,
)
from alignkit.ops.sampling import sampling_distribution
from alignkit.rollout import GenerationEngine, Prompt, SamplingConfig
from alignkit.rollout.teacher import TeacherGuidedEngine

VOCAB = 8


@pytest.fixture(scope="module")
def models():
    return tiny_llama(VOCAB, 1, 16, 40.0), tiny_llama(VOCAB, 7, 32, 60.0), TinyVocabTokenizer(VOCAB)


def _prompts() -> list[Prompt]:
    return [Prompt("a", [2, 3, 4, 5], {}), Prompt("b", [6, 7], {}), Prompt("c", [3], {})]


def _logits(model, exp) -> torch.Tensor:
    positions = (exp.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(
            input_ids=exp.input_ids, attention_mask=exp.attention_mask, position_ids=positions
        ).logits


def _next_token_logits(model, prompt: Prompt) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt.input_ids])).logits[0, -1]


def test_teacher_equal_to_policy_gives_alpha_one_and_unit_weights(models):
    policy, _, tokenizer = models
    engine = TeacherGuidedEngine(policy, policy, tokenizer)
    sampling = SamplingConfig(max_new_tokens=6, samples_per_prompt=3)
    assert isinstance(engine, GenerationEngine) and engine.samples_policy(sampling) is False
    exp = engine.generate(_prompts(), sampling, generator=torch.Generator().manual_seed(0))
    assert engine.stats()["sampling/alpha_mean"] == pytest.approx(1.0, abs=1e-12)
    assert engine.stats()["sampling/fallback_share"] == 0.0
    # The importance weights are the trainer's: pi (a re-scoring forward) over the recorded q.
    rescored = sequence_logprobs(_logits(policy, exp), exp.input_ids, exp.response_mask)
    weights = truncated_importance_weights(rescored, exp.behaviour_logprobs, max_weight=2.0)
    mask = exp.response_mask
    assert float(weights[mask].max()) == pytest.approx(1.0, abs=1e-5)
    ess = effective_sample_size(weights, mask) / mask.sum()
    assert float(ess) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(weights[exp.response_mask], torch.ones(()), atol=1e-5)


def test_samples_follow_the_fixed_alpha_mixture(models):
    policy, teacher, tokenizer = models
    prompt = Prompt("p", [2, 5, 3], {})
    alpha = 0.4
    logq = geometric_mixture_logprobs(
        _next_token_logits(policy, prompt), _next_token_logits(teacher, prompt), alpha
    )
    n = 4000
    engine = TeacherGuidedEngine(policy, teacher, tokenizer, alpha=alpha)
    exp = engine.generate(
        [prompt],
        SamplingConfig(max_new_tokens=1, samples_per_prompt=n),
        generator=torch.Generator().manual_seed(0),
    )
    assert engine.stats()["sampling/alpha_mean"] == pytest.approx(alpha)
    counts = torch.bincount(exp.input_ids[:, -1], minlength=VOCAB).double()
    expected = logq.double().exp() * n
    keep = expected > 5
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
    pooled = torch.cat([expected[keep], expected[~keep].sum()[None]])
    assert int(keep.sum()) >= 4
    assert chi_square_pvalue(observed, pooled) > 0.001
    # Power: the policy's own distribution is rejected by the same counts.
    on_policy = _next_token_logits(policy, prompt).double().softmax(-1) * n
    assert chi_square_pvalue(counts, on_policy.clamp_min(1e-3)) < 1e-6


@pytest.mark.parametrize("rule", ["kl_symmetry", "min_variance", 0.3])
@pytest.mark.parametrize("top_k", [0, 5])
def test_recorded_log_q_equals_the_mixture_from_both_models_logits(models, rule, top_k):
    policy, teacher, tokenizer = models
    sampling = SamplingConfig(max_new_tokens=8, samples_per_prompt=2, temperature=0.8, top_k=top_k)
    engine = TeacherGuidedEngine(policy, teacher, tokenizer, alpha=rule)
    exp = engine.generate(_prompts(), sampling, generator=torch.Generator().manual_seed(4))
    assert int(exp.response_lengths.min()) < 8  # some rows finished early (compaction ran)
    mask = exp.response_mask[:, 1:]
    policy_logits = _logits(policy, exp)[:, :-1][mask]  # logits at t-1 predict token t
    teacher_logits = _logits(teacher, exp)[:, :-1][mask]
    logp = sampling_distribution(policy_logits, 0.8, top_k)
    logt = sampling_distribution(teacher_logits, 0.8, top_k)
    if rule == "min_variance":
        scores = (teacher_logits / 0.8).log_softmax(-1) - (policy_logits / 0.8).log_softmax(-1)
        logq = min_variance_proposal_logprobs(logp, scores, floor=0.1)
    else:
        alpha = kl_symmetry_alpha(logp, logt).alpha if rule == "kl_symmetry" else rule
        logq = geometric_mixture_logprobs(logp, logt, alpha)
    tokens = exp.input_ids[:, 1:][mask][:, None]
    expected = logq.gather(1, tokens).squeeze(1)
    assert torch.allclose(exp.behaviour_logprobs[:, 1:][mask], expected, atol=1e-4)
    assert bool((exp.behaviour_logprobs[~exp.response_mask] == 0).all())
    # pi/q of the sampled tokens (the weights the trainer applies): an ESS fraction in (0, 1].
    weights = truncated_importance_weights(logp.gather(1, tokens), expected[:, None], 1e6)
    assert 0 < float(effective_sample_size(weights)) / len(weights) <= 1


def test_importance_weighted_policy_gradient_is_unbiased(models):
    """E_q[(π/q)·R(y)·∇log π(y)] = ∇E_π[R]: the Monte-Carlo mean lies within 4.5 exact
    standard errors of the exact gradient, and the unweighted mean does not."""
    policy, _, tokenizer = models
    # A teacher whose q_0.5 covers π (weights up to ~10): heavier tails make the test powerless.
    teacher = tiny_llama(VOCAB, 7, 32, 12.0)
    prompt = Prompt("p", [2, 5, 3], {})
    reward = torch.tensor([0.0, 1.0, -0.5, 2.0, 0.3, -1.0, 0.7, 1.5], dtype=torch.float64)
    params = [policy.lm_head.weight]

    def grad_of(value: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(value, params, retain_graph=True)[0].flatten().double()

    with torch.enable_grad():
        logp_all = policy(input_ids=torch.tensor([prompt.input_ids])).logits[0, -1].log_softmax(-1)
        exact = grad_of((logp_all.exp() * reward.float()).sum())
        score_grads = torch.stack([grad_of(logp_all[y]) for y in range(VOCAB)])  # [V, P]
    logq = geometric_mixture_logprobs(
        logp_all.detach(), _next_token_logits(teacher, prompt), 0.5
    ).double()
    # Every token's contribution (π/q)·R·∇log π, its exact mean and variance under q.
    contributions = ((logp_all.detach().double() - logq).exp() * reward)[:, None] * score_grads
    q = logq.exp()[:, None]
    assert torch.allclose((q * contributions).sum(0), exact, atol=1e-5)  # the identity itself
    variance = (q * contributions**2).sum(0) - (q * contributions).sum(0) ** 2

    n = 6000
    engine = TeacherGuidedEngine(policy, teacher, tokenizer, alpha=0.5)
    exp = engine.generate(
        [prompt],
        SamplingConfig(max_new_tokens=1, samples_per_prompt=n),
        generator=torch.Generator().manual_seed(1),
    )
    tokens = exp.input_ids[:, -1]
    weights = truncated_importance_weights(
        logp_all.detach()[tokens], exp.behaviour_logprobs[:, -1], max_weight=1e6
    ).double()
    assert 2.0 < float(weights.max()) < 1e6  # the weights matter, and the cap never binds
    per_sample = (weights * reward[tokens])[:, None] * score_grads[tokens]  # [n, P]
    stderr = (variance.clamp_min(0) / n).sqrt()
    informative = stderr > 1e-6
    assert int(informative.sum()) >= 8
    z = (per_sample.mean(0) - exact)[informative] / stderr[informative]
    assert float(z.abs().max()) < 4.5, z
    # Without the weights the mean is visibly biased.
    unweighted = (reward[tokens][:, None] * score_grads[tokens]).mean(0)
    assert float(((unweighted - exact)[informative] / stderr[informative]).abs().max()) > 10


def test_schedule_and_snr_rules_report_alpha(models):
    policy, teacher, tokenizer = models
    sampling = SamplingConfig(max_new_tokens=4, samples_per_prompt=2)
    engine = TeacherGuidedEngine(policy, teacher, tokenizer, alpha=lambda it: 1.0 / (1 + it))
    engine.set_iteration(3)
    engine.generate(_prompts(), sampling, generator=torch.Generator().manual_seed(0))
    assert engine.stats()["sampling/alpha_mean"] == pytest.approx(0.25)
    snr = TeacherGuidedEngine(policy, teacher, tokenizer, alpha="snr")
    snr.generate(_prompts(), sampling, generator=torch.Generator().manual_seed(0))
    assert 0.0 <= snr.stats()["sampling/alpha_mean"] <= 1.0
    bad = TeacherGuidedEngine(policy, teacher, tokenizer, alpha=lambda it: 2.0)
    with pytest.raises(ConfigError, match=r"the schedule gave 2\.0"):
        bad.generate(_prompts(), sampling, generator=torch.Generator().manual_seed(0))


def test_bad_configurations_are_refused(models):
    policy, teacher, tokenizer = models
    other = TinyVocabTokenizer({**{str(i): i for i in range(VOCAB - 1)}, "x": VOCAB - 1})
    with pytest.raises(
        ConfigError, match=r"teacher's tokenizer differs.*only the teacher's: \['x'\]"
    ):
        TeacherGuidedEngine(policy, teacher, tokenizer, teacher_tokenizer=other)
    small = TinyVocabTokenizer(VOCAB + 4)
    with pytest.raises(ConfigError, match="do not cover the tokenizer's 12 tokens"):
        TeacherGuidedEngine(policy, teacher, small)
    with pytest.raises(ConfigError, match="unknown rule 'kl'"):
        TeacherGuidedEngine(policy, teacher, tokenizer, alpha="kl")
    with pytest.raises(ConfigError, match=r"must lie in \[0, 1\], got 1\.5"):
        TeacherGuidedEngine(policy, teacher, tokenizer, alpha=1.5)


@pytest.fixture(scope="module")
def tiny_pair():
    from alignkit.models import load_policy

    teacher, tokenizer = load_policy("tiny", seed=5)
    reference, _ = load_policy("tiny", seed=6)
    return teacher, reference, tokenizer


def _summed_logprob(model, input_ids, attention_mask, response_mask) -> torch.Tensor:
    """Independent path: a full forward, all logits, the shift done by sequence_logprobs."""
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions
        ).logits
    return sequence_logprobs(logits, input_ids, response_mask).sum(-1)


def test_teacher_log_ratio_reward_from_texts_and_from_sampled_ids(tiny_pair):
    from alignkit.data.collate import SFTCollator
    from alignkit.data.tokenize import tokenize_sft
    from alignkit.rollout import TransformersEngine, prompts_from_records
    from alignkit.rollout.model_rewards import TeacherLogRatioReward

    teacher, reference, tokenizer = tiny_pair
    prompts = ["Say hi.", "Add 2 and 3."]
    completions = ["hi there", "5"]
    reward = TeacherLogRatioReward(teacher, reference, tokenizer, batch_size=1)
    got = reward(prompts, completions, [{}, {}])
    examples = tokenize_sft(
        [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)],
        tokenizer,
    )
    batch = SFTCollator(pad_token_id=tokenizer.pad_token_id)(list(examples))
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"] != -100)
    expected = _summed_logprob(teacher, *args) - _summed_logprob(reference, *args)
    assert got.shape == (2,) and bool((got != 0).all())
    assert torch.allclose(got, expected, atol=1e-4)
    same = TeacherLogRatioReward(teacher, teacher, tokenizer)
    assert torch.equal(same(prompts, completions, [{}, {}]), torch.zeros(2))

    exp = TransformersEngine(reference, tokenizer).generate(
        prompts_from_records([{"prompt": p} for p in prompts], tokenizer),
        SamplingConfig(max_new_tokens=5, samples_per_prompt=2),
        generator=torch.Generator().manual_seed(0),
    )
    args = (exp.input_ids, exp.attention_mask, exp.response_mask)
    expected = _summed_logprob(teacher, *args) - _summed_logprob(reference, *args)
    assert torch.allclose(reward.score_experience(exp), expected, atol=1e-4)


def test_teacher_log_ratio_scores_only_the_final_completion_of_a_conversation(tiny_pair):
    from alignkit.data.tokenize import render_prompt
    from alignkit.rollout.model_rewards import TeacherLogRatioReward

    teacher, reference, tokenizer = tiny_pair
    conversation = [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "Again."},
    ]
    got = TeacherLogRatioReward(teacher, reference, tokenizer)([conversation], ["HI"], [{}])
    prompt = tokenizer(render_prompt(tokenizer, conversation))["input_ids"]
    answer = [*tokenizer("HI", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    ids = torch.tensor([prompt + answer])
    mask = torch.ones_like(ids)
    last = torch.tensor([[False] * len(prompt) + [True] * len(answer)])
    expected = _summed_logprob(teacher, ids, mask, last) - _summed_logprob(
        reference, ids, mask, last
    )
    assert torch.allclose(got, expected, atol=1e-4)
    # Scoring the earlier assistant turn too (what the reward did before) gives another value.
    every = last | torch.isin(
        ids, torch.tensor(tokenizer("hi there", add_special_tokens=False)["input_ids"])
    )
    assert int(every.sum()) > int(last.sum())
    other = _summed_logprob(teacher, ids, mask, every) - _summed_logprob(
        reference, ids, mask, every
    )
    assert float((other - got).abs()) > 1e-3


def test_teacher_log_ratio_from_a_reward_spec():
    from alignkit.rollout.rewards import build_reward_source

    source = build_reward_source(
        [{"teacher_log_ratio": {"teacher": "tiny", "reference": "tiny"}, "weight": 2.0}]
    )
    assert source.name == "2*teacher_log_ratio"
    # Same preset, same seed: the two models agree, the log-ratio is 0.
    assert torch.equal(source(["Say hi."], ["hi"], [{}]), torch.zeros(1))
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.teacher_log_ratio: expected"):
        build_reward_source([{"teacher_log_ratio": {"teacher": "tiny"}}])
    with pytest.raises(ConfigError, match="exactly one of 'function', 'model' or 'teacher_log"):
        build_reward_source([{"teacher_log_ratio": {}, "function": "exact_match"}])


def test_greedy_decoding_is_the_policys_own(models):
    from alignkit.rollout import TransformersEngine

    policy, teacher, tokenizer = models
    greedy = SamplingConfig(max_new_tokens=5, temperature=0.0)
    guided = TeacherGuidedEngine(policy, teacher, tokenizer).generate(
        _prompts(), greedy, generator=torch.Generator().manual_seed(0)
    )
    plain = TransformersEngine(policy, tokenizer).generate(
        _prompts(), greedy, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(guided.input_ids, plain.input_ids)


def test_parse_alpha_rules_numbers_and_linear_schedules():
    from alignkit.rollout.proposals import LinearAlpha, parse_alpha

    assert parse_alpha("kl_symmetry") == "kl_symmetry"
    assert parse_alpha("0.25") == 0.25 and parse_alpha(1) == 1.0
    schedule = parse_alpha("linear:0.2:1:4")
    assert isinstance(schedule, LinearAlpha) and repr(schedule) == "linear:0.2:1:4"
    assert [schedule(i) for i in (0, 2, 4, 9)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    with pytest.raises(ConfigError, match="is not linear:START:END:ITERATIONS"):
        parse_alpha("linear:0.2:1")
    with pytest.raises(ConfigError, match="START and END in"):
        parse_alpha("linear:0.2:1.5:3")
    with pytest.raises(ConfigError, match="unknown rule 'kl'"):
        parse_alpha("kl")
    with pytest.raises(ConfigError, match="expected a rule or a number"):
        parse_alpha(True)
