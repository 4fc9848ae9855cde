"""Episodes with an environment: the single-turn case equals the plain rollout, limits end
episodes the documented way, scores combine the environment's and the reward sources', and the
holes of the response mask reach the forward and the estimators."""

from __future__ import annotations

import math

import pytest
import torch
from env_helpers import ScriptedEngine, chat_tokenizer, turn_ending_llama

from alignkit.models.forward import token_logprobs
from alignkit.ops.advantages import get_advantage_estimator, terminal_rewards
from alignkit.rollout import SamplingConfig, TransformersEngine, prompts_from_records
from alignkit.rollout.environments import Environment, Step, environment_factory
from alignkit.rollout.episodes import (
    EnvironmentRollout,
    EpisodeError,
    EpisodeLimits,
    SingleTurnRollout,
)
from alignkit.rollout.rewards import FunctionReward

ROWS = [
    {"prompt": [{"role": "user", "content": f"What is {a} * 17?"}], "answer": str(a * 17)}
    for a in (12, 345)
]
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 * 3"}}\n</tool_call>'


def run(tokenizer, engine, env="calculator", rows=ROWS, samples=2, max_new_tokens=120, **limits):
    factory = environment_factory(env) if isinstance(env, str) else env
    rollout = EnvironmentRollout(factory, tokenizer, EpisodeLimits(**limits), check_streams=True)
    prompts = rollout.prompts_from_rows(rows, 1000)
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens, samples_per_prompt=samples, temperature=1.0
    )
    exp = rollout.generate(engine, prompts, sampling, generator=torch.Generator().manual_seed(3))
    return rollout, exp


def test_single_turn_environment_is_the_plain_rollout():
    tok = chat_tokenizer("smollm2")
    model = turn_ending_llama(tok, seed=2, eos_bias=1.0)
    sampling = SamplingConfig(max_new_tokens=10, samples_per_prompt=3, temperature=1.0)
    plain = SingleTurnRollout().generate(
        TransformersEngine(model, tok), prompts_from_records(ROWS, tok), sampling,
        generator=torch.Generator().manual_seed(5), group_offset=4,
    )  # fmt: skip
    rollout = EnvironmentRollout(environment_factory("single_turn"), tok)
    episodes = rollout.generate(
        TransformersEngine(model, tok), rollout.prompts_from_rows(ROWS, 100), sampling,
        generator=torch.Generator().manual_seed(5), group_offset=4,
    )  # fmt: skip
    for name in ("input_ids", "attention_mask", "response_mask", "behaviour_logprobs",
                 "response_lengths", "truncated", "group_index"):  # fmt: skip
        assert torch.equal(getattr(plain, name), getattr(episodes, name)), name
    assert plain.completions == episodes.completions and plain.prompts == episodes.prompts
    assert plain.row_fields == episodes.row_fields
    reward = FunctionReward(lambda prompts, completions, **_: [float(len(c)) for c in completions])
    assert torch.equal(SingleTurnRollout().score(plain, reward), rollout.score(episodes, reward))
    assert rollout.stats()["env/turns_mean"] == 1.0


def test_turn_limit_ends_an_episode_that_keeps_calling():
    tok = chat_tokenizer("qwen2")
    engine = ScriptedEngine(tok, lambda text: CALL)
    rollout, _ = run(tok, engine, max_turns=3)
    assert engine.calls == [2, 4, 4]
    for conv in rollout.episodes:
        assert (conv.turns, conv.limit, conv.tool_calls, conv.truncated) == (3, "turns", 2, False)
        assert [m["content"] for m in conv.messages if m["role"] == "tool"] == ["6", "6"]
    stats = rollout.stats()
    assert stats["env/turn_limit_frac"] == 1.0 and stats["env/tool_calls_mean"] == 2.0
    assert stats["env/stream_text_mismatch_frac"] == 0.0
    assert stats["env/stream_template_side_mismatch_frac"] == 0.0


def test_tool_call_limit_answers_with_an_error():
    tok = chat_tokenizer("smollm2")
    engine = ScriptedEngine(
        tok, lambda text: "6" if "<|im_start|>tool" in text else CALL + CALL + CALL
    )
    rollout, _ = run(tok, engine, max_tool_calls=2, samples=1, max_new_tokens=300)
    conv = rollout.episodes[0]
    tool = [m["content"] for m in conv.messages if m["role"] == "tool"]
    assert tool == ["6", "6", "error: the limit of 2 tool calls is reached; answer now"]
    assert (conv.tool_calls, conv.tool_errors, conv.turns, conv.limit) == (3, 1, 2, None)


def test_length_budget_and_truncation_end_episodes():
    tok = chat_tokenizer("smollm2")
    engine = ScriptedEngine(tok, lambda text: CALL)
    rollout, _ = run(tok, engine, samples=1, max_length=400)
    conv = rollout.episodes[0]
    assert conv.limit == "length" and len(conv.ids) <= 400
    rollout, exp = run(tok, ScriptedEngine(tok, lambda text: CALL), samples=1, max_new_tokens=5)
    conv = rollout.episodes[0]
    assert conv.truncated and conv.turns == 1 and conv.tool_calls == 0
    assert exp.truncated.tolist() == [True, True]


class Scored(Environment):
    """Rewards 0.5 at the first answer and asks again; ends with 1.0 at the second."""

    def step(self, message):
        if message["content"].startswith("again"):
            return Step(reward=1.0, done=True)
        return Step(messages=[{"role": "user", "content": "again?"}], reward=0.5)


def test_scores_add_the_environment_and_the_reward_sources():
    tok = chat_tokenizer("smollm2")
    engine = ScriptedEngine(tok, lambda text: "again" if "again?" in text else "first")
    rollout, exp = run(tok, engine, env=Scored, samples=1)
    assert [c.reward for c in rollout.episodes] == [1.5, 1.5]
    assert rollout.score(exp, None).tolist() == [1.5, 1.5]
    answers = []

    def source(prompts, completions, answer, **_):
        answers.extend(completions)
        return [1.0, None]

    scores = rollout.score(exp, FunctionReward(source))
    assert answers == ["again", "again"]  # the last assistant message, not the transcript
    assert scores[0] == 2.5 and math.isnan(scores[1])
    silent, quiet = run(tok, engine, env="single_turn", samples=1)
    assert silent.score(quiet, None).tolist() == [0.0, 0.0]  # no reward at all: 0, not NaN
    # The episodes travel with their batch: an earlier batch still scores as its own.
    assert rollout.score(exp, None).tolist() == [1.5, 1.5]
    assert rollout.score(exp.select([1]), None).tolist() == [1.5]


class Moody(Environment):
    def __init__(self) -> None:
        super().__init__()
        Moody.count = getattr(Moody, "count", 0) + 1
        self.system = f"mood {Moody.count}"


class Broken(Environment):
    def step(self, message):
        raise RuntimeError("boom")


def test_environment_errors_name_the_environment():
    tok = chat_tokenizer("smollm2")
    engine = ScriptedEngine(tok, lambda text: "hi")
    with pytest.raises(
        EpisodeError, match=r"Moody\.reset gave different messages for the same row"
    ):
        run(tok, engine, env=Moody)
    with pytest.raises(
        EpisodeError, match=r"Broken\.step raised RuntimeError: boom; on the message .hi."
    ):
        run(tok, engine, env=Broken)
    with pytest.raises(Exception, match=r"field .prompt.*more than data\.max_prompt_length=5"):
        EnvironmentRollout(environment_factory("calculator"), tok).prompts_from_rows(ROWS, 5)


class AskAgain(Environment):
    def step(self, message):
        return Step(messages=[{"role": "user", "content": "and then?"}])


def test_the_holes_reach_the_packed_forward_and_the_estimators():
    tok = chat_tokenizer("smollm2")
    model = turn_ending_llama(tok, seed=4)
    _, exp = run(tok, TransformersEngine(model, tok), env=AskAgain, samples=3, max_turns=3)
    mask = exp.response_mask
    holes = mask[:, exp.prompt_width :].int().diff(dim=1).eq(1).any()
    assert bool(holes)  # a sampled turn after an environment turn
    batch = {"input_ids": exp.input_ids, "attention_mask": exp.attention_mask}
    padded = token_logprobs(model, batch, mask, packed=False)
    packed = token_logprobs(model, batch, mask, packed=True)
    assert torch.allclose(padded, packed, atol=1e-5) and bool((packed[~mask] == 0).all())
    scores = torch.arange(len(exp), dtype=torch.float32)
    rewards = terminal_rewards(scores, mask)
    last = torch.where(mask, torch.arange(mask.shape[1]), -1).amax(1)
    assert torch.equal(rewards[torch.arange(len(exp)), last], scores)
    values = torch.randn(mask.shape)
    for name in ("grpo", "rloo", "reinforce_pp", "gae"):
        advantages, _ = get_advantage_estimator(name)(
            token_rewards=rewards,
            mask=mask,
            values=values,
            group_index=exp.group_index,
            gamma=1.0,
            lam=1.0,
        )
        assert bool((advantages[~mask] == 0).all()), name
    # GAE over the holes: with gamma = lam = 1, A_t = score - V_t (the environment's tokens
    # neither add reward nor break the trajectory).
    gae, _ = get_advantage_estimator("gae")(
        token_rewards=rewards, mask=mask, values=values, gamma=1.0, lam=1.0
    )
    expected = torch.where(mask, scores[:, None] - values, 0.0)
    assert torch.allclose(gae, expected, atol=1e-5)
