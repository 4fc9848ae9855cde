"""The token stream of multi-turn episodes against ``apply_chat_template`` of the conversation,
turn by turn, for two real chat templates (SmolLM2's ChatML, which renders no tools, and
Qwen2.5's, which renders tools and tool results its own way).

With a scripted policy that writes canonical text, the stream equals the template's tokens at
every turn and at the end (up to the last sampled EOS). With a real (tiny, random) model, the
text always equals the template's, every prompt and environment token equals the template's,
and each assistant turn either equals it or is reported as a non-canonical tokenisation of its
text (the sampled ids are kept).
"""

from __future__ import annotations

import re

import pytest
import torch
from env_helpers import CHAT_TEMPLATES, ScriptedEngine, chat_tokenizer, turn_ending_llama

from alignkit.models.forward import token_logprobs
from alignkit.rollout import SamplingConfig, TransformersEngine
from alignkit.rollout.chat_stream import TemplateDriftError, check_token_stream
from alignkit.rollout.environments import Environment, Step, environment_factory
from alignkit.rollout.episodes import EnvironmentRollout, EpisodeLimits

ROWS = [
    {"prompt": [{"role": "user", "content": f"What is {a} * 17?"}], "answer": str(a * 17)}
    for a in (12, 345, 6)
]


def calculator_script(text: str) -> str:
    """Call the tool, then a malformed call, then answer (decided by the results seen)."""
    a = int(re.findall(r"What is (\d+) \* 17", text)[-1])
    results = text.count("<|im_start|>tool") + text.count("<tool_response>")
    if results == 0:
        call = {"expression": f"{a} * 17"}
        return f'<tool_call>\n{{"name": "calculator", "arguments": {call}}}\n</tool_call>'.replace(
            "'", '"'
        )
    if results == 1:
        return '<tool_call>\n{"name": "calculator", "arguments": {"expression": }\n</tool_call>'
    return f"The answer is {a * 17}."


def episodes(tokenizer, engine, env="calculator", samples=2, **limits):
    rollout = EnvironmentRollout(
        environment_factory(env) if isinstance(env, str) else env,
        tokenizer,
        EpisodeLimits(**{"max_turns": 4, "max_length": 1500, **limits}),
    )
    prompts = rollout.prompts_from_rows(ROWS, 1000)
    sampling = SamplingConfig(max_new_tokens=120, samples_per_prompt=samples, temperature=1.0)
    exp = rollout.generate(engine, prompts, sampling, generator=torch.Generator().manual_seed(0))
    return rollout, exp


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
def test_scripted_tool_episodes_equal_the_template_at_every_turn(template):
    tok = chat_tokenizer(template)
    engine = ScriptedEngine(tok, calculator_script)
    rollout, exp = episodes(tok, engine)
    assert engine.calls == [3, 6, 6]  # one generate per turn, for the live conversations
    for conv in rollout.episodes:
        kinds = [s.kind for s in conv.segments]
        assert kinds == ["prompt", *["assistant", "environment"] * 2, "assistant"]
        tool = [m for m in conv.messages if m["role"] == "tool"]
        answer = int(re.findall(r"What is (\d+)", conv.messages[-6]["content"])[0]) * 17
        assert tool[0]["content"] == str(answer)
        assert tool[1]["content"].startswith("error: the tool call is not valid JSON")
        assert (conv.tool_calls, conv.tool_errors) == (2, 1)
        assert conv.last_answer == f"The answer is {answer}."
        for turn in range(conv.turns):
            check = check_token_stream(rollout.renderer, conv, turn)
            assert check.exact and check.text_equal and check.template_side_exact
        final = check_token_stream(rollout.renderer, conv)
        assert final.exact and final.text_equal and not final.noncanonical_turns
        # After the stream: only what the template writes after the final EOS (ChatML's "\n").
        full = rollout.renderer.encode(
            rollout.renderer.render(conv.messages, add_generation_prompt=False)
        )
        assert full[: len(conv.ids)] == conv.ids and conv.ids[-1] == tok.eos_token_id
        assert tok.decode(full[len(conv.ids) :]) == "\n"
    # The Experience: sampled tokens are the response mask, with holes at the tool turns.
    for i, conv in enumerate(rollout.episodes):
        row = exp.input_ids[i, exp.attention_mask[i].bool()].tolist()
        assert row == conv.ids
        mask = exp.response_mask[i, exp.attention_mask[i].bool()].tolist()
        assert mask == conv.sampled
        holes = [s for s in conv.segments if s.kind == "environment"]
        assert all(not any(mask[s.start : s.end]) for s in holes)
        behaviour = exp.behaviour_logprobs[i, exp.attention_mask[i].bool()]
        assert torch.equal(behaviour, -torch.tensor(mask, dtype=torch.float32))


def test_qwen2_structured_tool_calls_render_the_same_tokens():
    """Qwen2.5's template re-serialises structured ``tool_calls``: when the model wrote the
    call canonically, that rendering is the stream too."""
    tok = chat_tokenizer("qwen2")
    rollout, _ = episodes(tok, ScriptedEngine(tok, calculator_script), samples=1)
    conv = rollout.episodes[0]
    structured = [dict(m) for m in conv.messages[: conv.turn_messages[1]]]
    first_call = structured[-2]
    assert first_call["role"] == "assistant"
    first_call["content"] = ""
    first_call["tool_calls"] = [
        {
            "type": "function",
            "function": {"name": "calculator", "arguments": {"expression": "12 * 17"}},
        }
    ]
    text = rollout.renderer.render(structured, add_generation_prompt=True)
    start = rollout.episodes[0].segments[3].start  # the second assistant turn
    assert rollout.renderer.encode(text) == conv.ids[:start]
    assert rollout.renderer.template_tools  # the schemas went through tools=


def test_smollm2_gets_the_tool_instructions_in_its_system_message():
    tok = chat_tokenizer("smollm2")
    rollout, _ = episodes(tok, ScriptedEngine(tok, calculator_script), samples=1)
    assert not rollout.renderer.template_tools
    system = rollout.episodes[0].messages[0]
    assert system["role"] == "system" and '"name": "calculator"' in system["content"]


class AskAgain(Environment):
    """A user who asks a follow-up question after every answer (until max_turns)."""

    def step(self, message):
        return Step(messages=[{"role": "user", "content": "And 7 * 6? Answer briefly."}])


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
def test_sampled_episodes_keep_the_sampled_tokens_and_the_template_text(template):
    tok = chat_tokenizer(template)
    model = turn_ending_llama(tok, seed=1)
    rollout, exp = episodes(
        tok, TransformersEngine(model, tok), env=AskAgain, samples=4, max_turns=3
    )
    convs = rollout.episodes
    assert max(c.turns for c in convs) == 3  # every turn ends the sampled way (EOS or cap)
    noncanonical = 0
    for conv in convs:
        for turn in range(conv.turns):
            check = check_token_stream(rollout.renderer, conv, turn)
            assert check.text_equal and check.template_side_exact
            assert check.exact == (not check.noncanonical_turns)
        final = check_token_stream(rollout.renderer, conv)
        assert final.text_equal and final.template_side_exact
        noncanonical += len(final.noncanonical_turns)
    # Random tokens are often not how the tokenizer would write their text: kept as sampled.
    assert noncanonical > 0
    # The behaviour log-probs are the policy's, at the sampled tokens only (holes elsewhere).
    rescored = token_logprobs(
        model,
        {"input_ids": exp.input_ids, "attention_mask": exp.attention_mask},
        exp.response_mask,
    )
    assert torch.allclose(rescored, exp.behaviour_logprobs, atol=1e-4)
    assert bool((exp.behaviour_logprobs[~exp.response_mask] == 0).all())
    assert torch.equal(exp.response_lengths, exp.response_mask.sum(1))


def test_a_template_that_rewrites_the_past_is_refused():
    tok = chat_tokenizer("smollm2")
    tok.chat_template = tok.chat_template.replace("message['content']", "message['content'] | trim")
    engine = ScriptedEngine(tok, lambda text: " 42 ")
    with pytest.raises(TemplateDriftError, match="renders the conversation so far differently"):
        episodes(tok, engine, env=AskAgain, samples=1)
