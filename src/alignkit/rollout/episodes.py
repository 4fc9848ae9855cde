"""Rollouts for the trainer: one ``generate`` call (single-turn), or episodes with an environment.

The trainer asks a rollout for an iteration's ``Experience`` and its scores::

    exp    = rollout.generate(engine, prompts, sampling, generator=..., group_offset=...)
    scores = rollout.score(exp, reward_sources, score_texts)   # score_texts(source, completions)

:class:`SingleTurnRollout` is one ``engine.generate`` call, scored by the reward sources on the
completions. :class:`EnvironmentRollout` runs episodes (``rollout.environments``), batched
across conversations: every turn is ONE ``engine.generate`` call for the conversations still
running, each continuing from the exact token ids of its conversation so far (a prompt's
``input_ids``: nothing engine-specific, so every engine of the ``GenerationEngine`` contract
serves, in process or not). The first turn samples ``samples_per_prompt`` answers of each
prompt (the prompt prefilled once by engines that share it); later turns one answer per
conversation. Between turns, tool calls are parsed in the model's format and run
(``rollout.tools.ToolBox``), other messages go to the environment's ``step``, and the replies
are appended as the chat template renders them (``rollout.chat_stream``).

Each episode becomes one ``Experience`` row: the prompt left-padded to the common width, then
everything after it (assistant turns and environment turns) right-padded. ``response_mask`` is
True on the sampled tokens only, so the environment's tokens are holes in it: the policy loss,
its normaliser, the entropy, the KL and the estimators' scans all read that mask (the scans skip
masked positions: GAE's next value is the next *sampled* token's, the outcome reward sits on the
last sampled token). ``behaviour_logprobs`` are the engine's, 0 in the holes;
``response_lengths`` counts sampled tokens; ``truncated`` marks episodes whose last turn hit
``max_new_tokens`` (or the length budget) without an EOS; ``completions`` is the transcript after
the prompt (for the samples log). Advantages are per token over the whole trajectory, from the
episode's one score: there is no per-turn credit assignment.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignkit.data.loaders import load_records
from alignkit.errors import AlignkitError, DataError, RowProblem
from alignkit.rollout.chat_stream import ChatRenderer, Conversation, check_token_stream
from alignkit.rollout.engine import GenerationEngine
from alignkit.rollout.environments import Step
from alignkit.rollout.experience import Experience
from alignkit.rollout.generate import generate_batched
from alignkit.rollout.prompts import Prompt
from alignkit.rollout.sampling import SamplingConfig
from alignkit.rollout.tool_calls import detect_tool_format, get_tool_format
from alignkit.rollout.tools import Isolation, ToolBox, ToolCall, ToolResult

__all__ = [
    "EnvironmentRollout",
    "EpisodeError",
    "EpisodeLimits",
    "EpisodePrompt",
    "SingleTurnRollout",
]

_SHOWN_PROBLEMS = 20
RewardSource = Callable[[list[str], list[str], list[dict[str, Any]]], Tensor]


class EpisodeError(AlignkitError):
    """An environment's ``reset`` or ``step`` raised, or broke the protocol."""


@dataclass
class EpisodePrompt(Prompt):
    """A prompt with its whole row (``prompt`` included), which the environment resets from."""

    row: dict[str, Any] = field(default_factory=dict)


#: ``(source, completions) -> [N]`` scores of one Experience's rows with these completion texts.
TextScorer = Callable[[RewardSource, Sequence[str]], Tensor]


def _plain_scorer(exp: Experience) -> TextScorer:
    return lambda source, completions: source(exp.prompts, list(completions), exp.row_fields)


class SingleTurnRollout:
    """One ``engine.generate`` call per iteration; the reward sources score the completions."""

    def generate(
        self,
        engine: GenerationEngine,
        prompts: Sequence[Prompt],
        sampling: SamplingConfig,
        *,
        generator: torch.Generator,
        group_offset: int = 0,
    ) -> Experience:
        return engine.generate(prompts, sampling, generator=generator, group_offset=group_offset)

    def evaluate(
        self, engine: GenerationEngine, prompts: Sequence[Prompt], sampling: SamplingConfig
    ) -> Experience:
        """All ``prompts`` in one batch, rows in their order."""
        return generate_batched(
            engine, prompts, sampling, prompts_per_batch=len(prompts), generator=torch.Generator()
        )

    def score(
        self, exp: Experience, reward: RewardSource, score_texts: TextScorer | None = None
    ) -> Tensor:
        """The reward sources' scores of the completions (``score_texts(source, completions)``:
        the trainer's, with TRL's reward-function arguments; default: a plain call)."""
        return (score_texts or _plain_scorer(exp))(reward, exp.completions)

    def stats(self) -> dict[str, float]:
        return {}


@dataclass(frozen=True)
class EpisodeLimits:
    """Bounds of one episode and of its tool calls
    (``trainers.environment_config.EnvironmentConfig``)."""

    max_turns: int = 4
    max_tool_calls: int = 8
    max_length: int = 2048
    tool_timeout: float = 10.0
    tool_isolation: Isolation = "thread"
    max_tool_output_chars: int = 2000
    tool_concurrency: int = 8


class EnvironmentRollout:
    """Episodes with an environment (see the module docstring).

    Args:
        make_env: a new environment per episode (``environments.environment_factory``).
        tokenizer: the policy's (its chat template renders the conversation).
        limits: turns, tool calls, tokens, timeouts.
        tool_format: ``auto`` (from the chat template) or a registered format name.
        check_streams: check every finished episode's token stream against the chat template
            (``chat_stream.check_token_stream``) and log the results as ``env/stream_*``.
    """

    def __init__(
        self,
        make_env: Callable[[], Any],
        tokenizer: Any,
        limits: EpisodeLimits | None = None,
        *,
        tool_format: str = "auto",
        check_streams: bool = False,
    ) -> None:
        self.make_env = make_env
        self.tokenizer = tokenizer
        self.limits = limits or EpisodeLimits()
        schemas = self._toolbox(make_env()).schemas
        name = detect_tool_format(tokenizer) if tool_format == "auto" else tool_format
        self.tool_format = get_tool_format(name)
        self.renderer = ChatRenderer(tokenizer, schemas, self.tool_format)
        self.check_streams = check_streams
        self.episodes: list[Conversation] = []  # the last generate's (scores read exp.episodes)
        self._stats: dict[str, float] = {}

    def _toolbox(self, env: Any) -> ToolBox:
        limits = self.limits
        return ToolBox(
            env.tools,
            timeout=limits.tool_timeout,
            isolation=limits.tool_isolation,
            max_output_chars=limits.max_tool_output_chars,
        )

    # ------------------------------------------------------------------ prompts

    def start_messages(self, env: Any, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        """``env.reset(row)`` as the policy sees it (tool instructions added if needed)."""
        try:
            messages = env.reset(row)
        except AlignkitError:
            raise
        except Exception as err:  # the user's environment: one line, no traceback
            raise EpisodeError(
                f"environment {type(env).__name__}.reset raised {type(err).__name__}: {err}"
            ) from None
        return self.renderer.initial_messages(messages)

    def load_prompts(
        self, path: str | Path | Any, max_length: int, *, limit: int | None = None
    ) -> list[EpisodePrompt]:
        """The prompt file's rows (any file ``data.load_records`` reads) as
        :class:`EpisodePrompt`; see :meth:`prompts_from_rows`."""
        records = load_records(path, "prompt", keep_fields="all")
        records = records[:limit] if limit is not None else records
        return self.prompts_from_rows(records, max_length, source=str(path))

    def prompts_from_rows(
        self, rows: Sequence[Mapping[str, Any]], max_length: int, *, source: str = "rows"
    ) -> list[EpisodePrompt]:
        """Rows with a ``prompt`` as :class:`EpisodePrompt`, rendered as the first turn sees
        them; a row whose first turn is longer than ``max_length`` (``data.max_prompt_length``)
        is an error: cutting it would cut the tools' description or the question."""
        prompts, problems = [], []
        for i, row in enumerate(rows):
            text = self.renderer.render(
                self.start_messages(self.make_env(), row), add_generation_prompt=True
            )
            ids = self.renderer.encode(text)
            if len(ids) > max_length:
                problems.append(
                    RowProblem(
                        source,
                        i + 1,
                        "prompt",
                        f"the environment's first turn has {len(ids)} tokens, more than "
                        f"data.max_prompt_length={max_length}",
                    )
                )
            fields = {k: v for k, v in row.items() if k != "prompt"}
            prompts.append(EpisodePrompt(text=text, input_ids=ids, fields=fields, row=dict(row)))
        if problems:
            raise DataError(problems[:_SHOWN_PROBLEMS], total=len(problems))
        return prompts

    # ------------------------------------------------------------------ episodes

    def generate(
        self,
        engine: GenerationEngine,
        prompts: Sequence[Prompt],
        sampling: SamplingConfig,
        *,
        generator: torch.Generator,
        group_offset: int = 0,
    ) -> Experience:
        """``samples_per_prompt`` episodes of every prompt, rows grouped by prompt."""
        g = sampling.samples_per_prompt
        envs, convs, firsts = [], [], []
        for prompt in prompts:
            row = prompt.row if isinstance(prompt, EpisodePrompt) else {"prompt": prompt.text}
            group = [self.make_env() for _ in range(g)]
            starts = [self.start_messages(env, row) for env in group]
            if any(s != starts[0] for s in starts[1:]):
                raise EpisodeError(
                    f"environment {type(group[0]).__name__}.reset gave different messages for "
                    "the same row: the samples of a prompt must share it"
                )
            first = Conversation.start(self.renderer, starts[0])
            firsts.append(Prompt(prompt.text, list(first.ids), dict(prompt.fields)))
            envs += group
            convs += [first.copy() for _ in range(g)]
        boxes = [self._toolbox(env) for env in envs]
        live = list(range(len(convs)))
        turn = 0
        while live:
            turn += 1
            if turn == 1:
                exp = engine.generate(firsts, sampling, generator=generator)
            else:
                room = max(self.limits.max_length - len(convs[i].ids) for i in live)
                later = dataclasses.replace(
                    sampling,
                    samples_per_prompt=1,
                    max_new_tokens=min(sampling.max_new_tokens, room),
                )
                asked = [Prompt("", list(convs[i].ids)) for i in live]
                exp = engine.generate(asked, later, generator=generator)
            live = self._advance(exp, live, convs, envs, boxes, turn)
        self.episodes = convs
        texts = [p.text for p in firsts for _ in range(g)]
        fields = [dict(p.fields) for p in prompts for _ in range(g)]
        groups = torch.arange(len(prompts)).repeat_interleave(g) + group_offset
        self._stats = self._episode_stats(convs)
        return _experience(convs, texts, fields, groups, self.tokenizer)

    def _advance(
        self,
        exp: Experience,
        live: list[int],
        convs: list[Conversation],
        envs: list[Any],
        boxes: list[ToolBox],
        turn: int,
    ) -> list[int]:
        """Append the sampled turn of each live conversation, run its tool calls or its
        environment step; return the conversations that go on."""
        p, renderer, limits = exp.prompt_width, self.renderer, self.limits
        lengths, truncated = exp.response_lengths.tolist(), exp.truncated.tolist()
        calls: list[tuple[int, ToolCall]] = []
        calling: dict[int, list[str]] = {}  # conversation -> its malformed attempts
        for row, i in enumerate(live):
            conv = convs[i]
            room = limits.max_length - len(conv.ids)
            take = min(lengths[row], room)
            ids = exp.input_ids[row, p : p + take].tolist()
            message = conv.add_assistant(
                ids, exp.behaviour_logprobs[row, p : p + take].tolist(), renderer
            )
            if truncated[row] or take < lengths[row]:
                conv.done, conv.truncated = True, True
                conv.limit = "length" if take < lengths[row] else None
                continue
            found, malformed = self.tool_format.parse(message["content"])
            if found or malformed:
                if turn >= limits.max_turns:
                    conv.done, conv.limit = True, "turns"
                    continue
                calls += [(i, c) for c in found]
                calling[i] = malformed
                continue
            step = _step(envs[i], message)
            if step.reward is not None:
                conv.reward = (conv.reward or 0.0) + float(step.reward)
            if step.done or not step.messages or turn >= limits.max_turns:
                conv.done = True
                conv.limit = None if step.done or not step.messages else "turns"
                continue
            conv.add_environment(step.messages, renderer)
        results = self._run_tools(calls, convs, boxes)
        going = []
        for i in live:
            conv = convs[i]
            if conv.done:
                continue
            if i in calling:
                replies = [
                    *results.get(i, []),
                    *(ToolResult("tool_call", f"error: {e}", True) for e in calling[i]),
                ]
                conv.tool_calls += len(replies)
                conv.tool_errors += sum(r.error for r in replies)
                tool_messages = [
                    {"role": "tool", "name": r.name, "content": r.content} for r in replies
                ]
                conv.add_environment(tool_messages, renderer)
            if len(conv.ids) >= limits.max_length:
                conv.done, conv.limit = True, "length"
                continue
            going.append(i)
        return going

    def _run_tools(
        self, calls: list[tuple[int, ToolCall]], convs: list[Conversation], boxes: list[ToolBox]
    ) -> dict[int, list[ToolResult]]:
        """Every call of this turn (all conversations at once, ``tool_concurrency`` threads);
        calls past an episode's ``max_tool_calls`` are answered with an error."""
        budget = {i: self.limits.max_tool_calls - convs[i].tool_calls for i, _ in calls}
        jobs: list[tuple[int, ToolCall | None]] = []
        for i, call in calls:
            budget[i] -= 1
            jobs.append((i, call if budget[i] >= 0 else None))

        def run(job: tuple[int, ToolCall | None]) -> ToolResult:
            i, call = job
            if call is None:
                limit = self.limits.max_tool_calls
                return ToolResult(
                    "tool_call",
                    f"error: the limit of {limit} tool calls is reached; answer now",
                    True,
                )
            return boxes[i].call(call)

        results: dict[int, list[ToolResult]] = {}
        if jobs:
            with ThreadPoolExecutor(
                max_workers=min(len(jobs), self.limits.tool_concurrency)
            ) as pool:
                for (i, _), result in zip(jobs, pool.map(run, jobs), strict=True):
                    results.setdefault(i, []).append(result)
        return results

    # ------------------------------------------------------------------ scores, metrics

    def evaluate(
        self, engine: GenerationEngine, prompts: Sequence[Prompt], sampling: SamplingConfig
    ) -> Experience:
        """One episode per prompt, all in one batch, rows in the prompts' order."""
        one = dataclasses.replace(sampling, samples_per_prompt=1)
        return self.generate(engine, prompts, one, generator=torch.Generator())

    def score(
        self, exp: Experience, reward: RewardSource | None, score_texts: TextScorer | None = None
    ) -> Tensor:
        """Per episode of ``exp`` (made by :meth:`generate`, which leaves the episodes in
        ``exp.episodes``, so any earlier batch can be scored while the next one is generated):
        the sum of the environment's step rewards (0 when it gave none, e.g. a limit ended the
        episode first) plus the reward sources' score of its last assistant message (NaN where
        a source says "not applicable"; ``score_texts`` as in :meth:`SingleTurnRollout.score`)."""
        if exp.episodes is None:
            raise ValueError("score() takes an Experience made by EnvironmentRollout.generate()")
        env = torch.tensor([c.reward or 0.0 for c in exp.episodes], dtype=torch.float32)
        if reward is None:
            return env
        answers = [c.last_answer for c in exp.episodes]
        return env + (score_texts or _plain_scorer(exp))(reward, answers)

    def stats(self) -> dict[str, float]:
        """The episode metrics (``env/...``) of the last :meth:`generate`."""
        return dict(self._stats)

    def _episode_stats(self, convs: Sequence[Conversation]) -> dict[str, float]:
        n = max(len(convs), 1)
        stats = {
            "env/turns_mean": sum(c.turns for c in convs) / n,
            "env/tool_calls_mean": sum(c.tool_calls for c in convs) / n,
            "env/tool_errors_mean": sum(c.tool_errors for c in convs) / n,
            "env/turn_limit_frac": sum(c.limit == "turns" for c in convs) / n,
            "env/length_limit_frac": sum(c.limit == "length" for c in convs) / n,
        }
        if self.check_streams:
            checks = [check_token_stream(self.renderer, c) for c in convs]
            stats["env/stream_text_mismatch_frac"] = sum(not c.text_equal for c in checks) / n
            stats["env/stream_template_side_mismatch_frac"] = (
                sum(not c.template_side_exact for c in checks) / n
            )
            turns = max(sum(c.turns for c in convs), 1)
            stats["env/stream_noncanonical_turn_frac"] = (
                sum(len(c.noncanonical_turns) for c in checks) / turns
            )
        return stats


def _step(env: Any, message: dict[str, Any]) -> Step:
    try:
        step = env.step(dict(message))
    except AlignkitError:
        raise
    except Exception as err:  # the user's environment: one line, no traceback
        raise EpisodeError(
            f"environment {type(env).__name__}.step raised {type(err).__name__}: {err}; "
            f"on the message {message['content'][:160]!r}"
        ) from None
    if not isinstance(step, Step):
        raise EpisodeError(
            f"environment {type(env).__name__}.step returned {type(step).__name__}, not a Step"
        )
    return step


def _experience(
    convs: Sequence[Conversation],
    prompts: list[str],
    fields: list[dict[str, Any]],
    groups: Tensor,
    tokenizer: Any,
) -> Experience:
    """The episodes as Experience rows (see the module docstring for the layout)."""
    n = len(convs)
    width = max(c.prompt_length for c in convs)
    longest = max(len(c.ids) - c.prompt_length for c in convs)
    input_ids = torch.full((n, width + longest), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, width + longest), dtype=torch.long)
    sampled = torch.zeros((n, width + longest), dtype=torch.bool)
    behaviour = torch.zeros((n, width + longest), dtype=torch.float32)
    for i, c in enumerate(convs):
        start, end = width - c.prompt_length, width + len(c.ids) - c.prompt_length
        input_ids[i, start:end] = torch.tensor(c.ids)
        attention[i, start:end] = 1
        sampled[i, start:end] = torch.tensor(c.sampled)
        behaviour[i, start:end] = torch.tensor(c.logprobs)
    transcripts = tokenizer.batch_decode(
        [c.ids[c.prompt_length :] for c in convs], skip_special_tokens=True
    )
    return Experience(
        input_ids=input_ids,
        attention_mask=attention,
        response_mask=sampled,
        prompt_width=width,
        behaviour_logprobs=behaviour,
        scores=torch.full((n,), math.nan),
        group_index=groups,
        response_lengths=sampled.sum(dim=1),
        truncated=torch.tensor([c.truncated for c in convs], dtype=torch.bool),
        prompts=prompts,
        completions=transcripts,
        row_fields=fields,
        episodes=list(convs),
    )
