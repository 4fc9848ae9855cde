"""The token stream of a multi-turn conversation, grown turn by turn, and its check against the
chat template.

Token-in/token-out: a :class:`Conversation` holds the exact ids the policy has seen and produced.
It starts from the chat template's rendering of the prompt messages (``add_generation_prompt``);
an assistant turn appends the ids the engine *sampled* (its EOS included) with their behaviour
log-probs; an environment turn (tool results, a user's reply) appends the template's own tokens
for the new messages: the template renders the whole conversation, the text already in the
stream must be a prefix of it, and the rest (``<|im_end|>``'s newline, the tool message, the
next ``<|im_start|>assistant\\n``) is tokenised and appended. Nothing already in the stream is
ever re-tokenised, so the policy is trained on exactly the tokens it produced and saw.

Where that equals ``apply_chat_template(final conversation)`` (:func:`check_token_stream`):

- the text: always (decoding the stream gives the template's text, up to the stream's end);
  otherwise :meth:`Conversation.add_environment` raises ``TemplateDriftError`` (a template that
  re-renders earlier turns differently, e.g. trims the assistant's text or drops its reasoning);
- the prompt's and the environment's tokens: always, token for token, when each environment
  turn starts after a special token (the assistant's EOS): tokenisation never merges across a
  special token. The assistant's message is kept as the text it wrote (its tool calls as it wrote
  them, not re-serialised), so the template renders exactly that text;
- the assistant's tokens: when the model sampled the canonical tokenisation of its text.
  Sampling can produce another one (``"1" "2"`` where the tokenizer writes ``"12"``, or a
  leading newline that merges with the template's); the stream keeps the sampled ids (what the
  policy produced, hence what it is trained on) and the check reports the turn as non-canonical.
  This is the one place where the stream cannot equal the template's tokens, and re-tokenising
  instead (decode then encode) would train the policy on tokens it never produced.

A finished conversation ends with the assistant's last sampled token: what the template writes
after it (ChatML's ``\\n`` after ``<|im_end|>``) was never seen by the policy and is not in it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from alignkit.errors import AlignkitError
from alignkit.rollout.tool_calls import ToolCallFormat, renders_tools
from alignkit.rollout.tools import ToolCall

__all__ = [
    "ChatRenderer",
    "Conversation",
    "Segment",
    "StreamCheck",
    "TemplateDriftError",
    "check_token_stream",
]

Message = dict[str, Any]


class TemplateDriftError(AlignkitError):
    """The chat template renders the conversation so far differently from what the policy saw,
    so no environment turn can be appended without re-tokenising the past."""


class ChatRenderer:
    """How one tokenizer (and the episode's tools) turns messages into the policy's tokens.

    ``schemas``: the tools' JSON schemas. A template that renders ``tools=`` gets them; one that
    does not gets the format's instructions in the system message (:meth:`initial_messages`).
    """

    def __init__(
        self,
        tokenizer: Any,
        schemas: Sequence[dict[str, Any]] = (),
        tool_format: ToolCallFormat | None = None,
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise AlignkitError(
                "environments need a tokenizer with a chat template (the conversation is "
                "rendered by it)"
            )
        self.tokenizer = tokenizer
        self.schemas = list(schemas)
        self.tool_format = tool_format
        self.template_tools = bool(self.schemas) and renders_tools(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.special_ids = frozenset(tokenizer.all_special_ids) | frozenset(
            i for i, t in tokenizer.added_tokens_decoder.items() if t.special
        )

    def initial_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[Message]:
        """The prompt messages the policy sees: with the tool instructions in the system message
        when the template does not render ``tools=`` itself, and the structured ``tool_calls``
        of assistant messages (an environment's demonstration) written in the model's format
        as their text, the way the model writes calls."""
        messages = [self._as_text(m) for m in messages]
        if not self.schemas or self.template_tools or self.tool_format is None:
            return messages
        text = self.tool_format.instructions(self.schemas)
        if messages and messages[0].get("role") == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{text}"
        else:
            messages.insert(0, {"role": "system", "content": text})
        return messages

    def _as_text(self, message: Mapping[str, Any]) -> Message:
        message = dict(message)
        calls = message.pop("tool_calls", None)
        if not calls:
            return message
        if self.tool_format is None:
            raise AlignkitError("a message with tool_calls needs a tool-call format")
        written = [
            self.tool_format.write(
                ToolCall(c["function"]["name"], dict(c["function"]["arguments"]))
            )
            for c in calls
        ]
        content = message.get("content") or ""
        message["content"] = "\n".join([content, *written] if content else written)
        return message

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool) -> str:
        tools = self.schemas if self.template_tools else None
        return self.tokenizer.apply_chat_template(
            list(messages), tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(
            list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )


@dataclass(frozen=True)
class Segment:
    """Stream positions ``[start, end)`` written by one side: the ``prompt``, an ``assistant``
    turn (sampled) or an ``environment`` turn (the template's tokens)."""

    kind: Literal["prompt", "assistant", "environment"]
    start: int
    end: int


@dataclass
class Conversation:
    """One episode's messages and token stream (see the module docstring)."""

    messages: list[Message]
    ids: list[int]
    logprobs: list[float]
    segments: list[Segment]
    prompt_length: int
    #: Per assistant turn: how many messages preceded it (for the check of every turn).
    turn_messages: list[int] = field(default_factory=list)
    tool_calls: int = 0
    tool_errors: int = 0
    reward: float | None = None
    done: bool = False
    truncated: bool = False
    limit: str | None = None  # why the episode stopped early: "turns", "length"

    @classmethod
    def start(cls, renderer: ChatRenderer, messages: Sequence[Mapping[str, Any]]) -> Conversation:
        """The prompt ``messages`` (as :meth:`ChatRenderer.initial_messages` made them),
        rendered with the generation prompt and tokenised once."""
        shown = [dict(m) for m in messages]
        ids = renderer.encode(renderer.render(shown, add_generation_prompt=True))
        return cls(shown, ids, [0.0] * len(ids), [Segment("prompt", 0, len(ids))], len(ids))

    def copy(self) -> Conversation:
        """A fresh episode from the same start (the samples of one prompt)."""
        return Conversation(
            [dict(m) for m in self.messages],
            list(self.ids),
            list(self.logprobs),
            list(self.segments),
            self.prompt_length,
        )

    @property
    def turns(self) -> int:
        return len(self.turn_messages)

    @property
    def sampled(self) -> list[bool]:
        """Per stream position: sampled by the policy (the loss is taken there only)."""
        mask = [False] * len(self.ids)
        for s in self.segments:
            if s.kind == "assistant":
                mask[s.start : s.end] = [True] * (s.end - s.start)
        return mask

    @property
    def last_answer(self) -> str:
        """The content of the last assistant message ('' before the first)."""
        for message in reversed(self.messages):
            if message["role"] == "assistant":
                return str(message["content"])
        return ""

    def add_assistant(
        self, ids: Sequence[int], logprobs: Sequence[float], renderer: ChatRenderer
    ) -> Message:
        """Append a sampled turn (its EOS included, if it emitted one) and its message, whose
        content is the decoded text before the EOS."""
        self.turn_messages.append(len(self.messages))
        start = len(self.ids)
        self.ids.extend(int(i) for i in ids)
        self.logprobs.extend(float(x) for x in logprobs)
        self.segments.append(Segment("assistant", start, len(self.ids)))
        body = list(ids[:-1]) if len(ids) and ids[-1] == renderer.eos else list(ids)
        message = {"role": "assistant", "content": renderer.decode(body)}
        self.messages.append(message)
        return message

    def add_environment(self, messages: Sequence[Message], renderer: ChatRenderer) -> None:
        """Append the template's tokens for ``messages`` and the next generation prompt."""
        seen = renderer.decode(self.ids)
        rendered = renderer.render([*self.messages, *messages], add_generation_prompt=True)
        if not rendered.startswith(seen):
            at = next(
                (i for i, (a, b) in enumerate(zip(seen, rendered, strict=False)) if a != b),
                min(len(seen), len(rendered)),
            )
            raise TemplateDriftError(
                "the chat template renders the conversation so far differently from the tokens "
                f"the policy saw, at character {at}: the stream has {seen[at : at + 60]!r}, the "
                f"template {rendered[at : at + 60]!r} (a template that rewrites earlier turns "
                "cannot be continued token-in/token-out)"
            )
        self.messages.extend(dict(m) for m in messages)
        start = len(self.ids)
        added = renderer.encode(rendered[len(seen) :])
        self.ids.extend(added)
        self.logprobs.extend([0.0] * len(added))
        self.segments.append(Segment("environment", start, len(self.ids)))


@dataclass(frozen=True)
class StreamCheck:
    """The stream up to a point against ``apply_chat_template`` of the messages up to it.

    ``text_equal``: the decoded stream is the template's text (up to the stream's end).
    ``exact``: the ids are the template's ids (up to the stream's end). ``template_side_exact``:
    every prompt and environment segment is exactly the template's tokens over its text, its
    boundaries on token boundaries. ``noncanonical_turns``: the assistant turns (0-based) whose
    sampled ids differ from the template's tokenisation of their text.
    """

    text_equal: bool
    exact: bool
    template_side_exact: bool
    noncanonical_turns: tuple[int, ...]


def check_token_stream(
    renderer: ChatRenderer, conversation: Conversation, turn: int | None = None
) -> StreamCheck:
    """Check the stream as it was when assistant turn ``turn`` started (the prompt and every
    turn before it, then the generation prompt), or the whole finished stream (None)."""
    if turn is None:
        end, messages, prompt = len(conversation.ids), conversation.messages, False
    else:
        end = conversation.segments[_assistant_segments(conversation)[turn]].start
        messages, prompt = conversation.messages[: conversation.turn_messages[turn]], True
    ids = conversation.ids[:end]
    text = renderer.render(messages, add_generation_prompt=prompt)
    encoded = renderer.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    template_ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    seen = renderer.decode(ids)
    template_side, noncanonical, turn_index = True, [], 0
    for segment in conversation.segments:
        if segment.start >= end:
            break
        stop = min(segment.end, end)
        span = (len(renderer.decode(ids[: segment.start])), len(renderer.decode(ids[:stop])))
        same = ids[segment.start : stop] == _tokens_over(template_ids, offsets, span)
        if segment.kind == "assistant":
            if not same:
                noncanonical.append(turn_index)
            turn_index += 1
        elif not same:
            template_side = False
    return StreamCheck(
        text_equal=text.startswith(seen),
        exact=ids == template_ids[: len(ids)],
        template_side_exact=template_side,
        noncanonical_turns=tuple(noncanonical),
    )


def _assistant_segments(conversation: Conversation) -> list[int]:
    return [i for i, s in enumerate(conversation.segments) if s.kind == "assistant"]


def _tokens_over(ids: list[int], offsets: list[Any], span: tuple[int, int]) -> list[int] | None:
    """The template's tokens that exactly tile the characters ``span``, or None when a token
    crosses one of its ends."""
    start, end = span
    inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    if not inside:
        return [] if start == end else None
    if offsets[inside[0]][0] != start or offsets[inside[-1]][1] != end:
        return None
    return [ids[i] for i in inside]
