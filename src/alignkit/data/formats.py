"""Record formats: validate one raw row and normalise it to alignkit's internal representation.

Formats (field names follow TRL; see DESIGN.md "Data formats"):

=====================  ======================================================================
``prompt``             ``{"prompt": str | messages}``
``sft``                ``{"prompt", "completion"}``, ``{"messages": [...]}`` (the last message
                       must be the assistant's: it is the completion, the rest is the prompt)
                       or ``{"text"}`` (plain language modelling: an empty prompt)
``preference``         ``{"prompt", "chosen", "rejected", "margin"?}``
``safety_preference``  PKU-SafeRLHF ``{"prompt", "response_0", "response_1",
                       "better_response_id", "safer_response_id", "is_response_0_safe",
                       "is_response_1_safe"}`` or flattened ``{"prompt", "chosen", "rejected",
                       "chosen_safety", "rejected_safety"}``
``rating``             ``{"prompt", "response", "rating"}``
=====================  ======================================================================

``messages`` is a non-empty list of ``{"role", "content"}``. A completion, chosen or rejected
answer may be a string or a one-message assistant list (TRL's conversational form); it is
normalised to its string. Unknown fields are ignored.

Safety preferences normalise to one representation, so Safe-DPO can derive both preferences:
``{"prompt", "chosen", "rejected", "chosen_safety", "rejected_safety", "chosen_is_safe",
"rejected_is_safe"}`` with ``chosen``/``rejected`` ordered by helpfulness and ``*_safety`` a
safety score where *higher is safer*, so ``delta_S = chosen_safety - rejected_safety`` (seed 000)
and ``-safety`` reads as a cost (> 0 unsafe).

- PKU rows: ``safety = (+1 if safe else -1) + (+0.5 if the safer response else -0.5)``: its sign
  is the safe label and the safer response always scores higher (|delta_S| = 1 when both have
  the same label, 3 when one is safe). A row whose safer response is the unsafe one while the
  other is safe contradicts itself and is reported.
- Flattened rows: ``*_safety`` is a number (higher is safer) or a boolean (true = safe, read as
  +1 / -1); ``*_is_safe`` is ``safety >= 0``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["FORMATS", "ROLES", "normalize_row"]

FORMATS = ("prompt", "sft", "preference", "safety_preference", "rating")
ROLES = ("system", "user", "assistant", "tool")

_MISSING = object()
_TRUE_TEXT = {"true", "1", "yes"}
_FALSE_TEXT = {"false", "0", "no"}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list"}.get(
        type(value), "object" if isinstance(value, Mapping) else type(value).__name__
    )


class _Row:
    """Reads typed fields from one raw row, collecting ``(field, message)`` problems."""

    def __init__(self, raw: Mapping[str, Any], text_cells: bool) -> None:
        self.raw = raw
        # CSV cells are always strings: numbers and booleans are parsed from their text.
        self.text_cells = text_cells
        self.problems: list[tuple[str, str]] = []

    def bad(self, field: str, message: str) -> None:
        self.problems.append((field, message))

    def get(self, field: str, optional: bool = False) -> Any:
        value = self.raw.get(field, _MISSING)
        if optional and (value is None or (self.text_cells and value == "")):
            return _MISSING  # an empty optional cell / null column value means "not given"
        if value is _MISSING and not optional:
            self.bad(field, "missing field")
        return value

    def string(self, field: str, value: Any) -> str | None:
        if not isinstance(value, str):
            self.bad(field, f"expected a string, got {_type_name(value)}")
            return None
        if not value.strip():
            self.bad(field, "empty string")
            return None
        return value

    def messages(self, field: str, value: list) -> list[dict[str, str]] | None:
        if not value:
            self.bad(field, "empty message list")
            return None
        out, ok = [], True
        for i, message in enumerate(value):
            where = f"{field}[{i}]"
            if not isinstance(message, Mapping):
                self.bad(where, f"expected a message object, got {_type_name(message)}")
                ok = False
                continue
            role = message.get("role", _MISSING)
            if role is _MISSING:
                self.bad(f"{where}.role", "missing field")
            elif role not in ROLES:
                self.bad(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
            if "content" not in message:
                self.bad(f"{where}.content", "missing field")
                content = None
            else:
                content = self.string(f"{where}.content", message["content"])
            if role not in ROLES or content is None:
                ok = False
                continue
            out.append({"role": role, "content": content})
        return out if ok else None

    def prompt(self, field: str = "prompt") -> str | list[dict[str, str]] | None:
        value = self.get(field)
        if value is _MISSING:
            return None
        if isinstance(value, list):
            return self.messages(field, value)
        if not isinstance(value, str):
            self.bad(field, f"expected a string or a message list, got {_type_name(value)}")
            return None
        return self.string(field, value)

    def prompt_value(self, field: str, value: Any) -> str | list[dict[str, str]] | None:
        """A prompt given as a value (not read from the row): a string or messages."""
        if isinstance(value, list):
            return self.messages(field, value)
        return self.string(field, value)

    def answer(self, field: str) -> str | None:
        """A response: a string or TRL's one-assistant-message list."""
        value = self.get(field)
        if value is _MISSING:
            return None
        if not isinstance(value, list):
            return self.string(field, value)
        messages = self.messages(field, value)
        if messages is None:
            return None
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            roles = [m["role"] for m in messages]
            self.bad(field, f"expected one assistant message, got roles {roles}")
            return None
        return messages[0]["content"]

    def number(self, field: str, optional: bool = False) -> float | None:
        value = self.get(field, optional)
        if value is _MISSING:
            return None
        if self.text_cells and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                self.bad(field, f"expected a number, got {value!r}")
                return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.bad(field, f"expected a number, got {_type_name(value)}")
            return None
        if not math.isfinite(value):
            self.bad(field, f"expected a finite number, got {value}")
            return None
        return float(value)

    def boolean(self, field: str) -> bool | None:
        value = self.get(field)
        if value is _MISSING:
            return None
        if self.text_cells and isinstance(value, str):
            text = value.strip().lower()
            if text in _TRUE_TEXT | _FALSE_TEXT:
                return text in _TRUE_TEXT
        if not isinstance(value, bool):
            self.bad(field, f"expected true or false, got {value!r}")
            return None
        return value

    def response_id(self, field: str) -> int | None:
        value = self.get(field)
        if value is _MISSING:
            return None
        if self.text_cells and isinstance(value, str) and value.strip() in ("0", "1"):
            return int(value)
        if isinstance(value, float) and value in (0.0, 1.0):
            return int(value)  # Parquet/pandas may store small integers as floats
        if isinstance(value, bool) or value not in (0, 1):
            self.bad(field, f"expected response id 0 or 1, got {value!r}")
            return None
        return int(value)


def _prompt_row(row: _Row) -> dict[str, Any]:
    return {"prompt": row.prompt()}


def _sft_row(row: _Row) -> dict[str, Any]:
    if "text" in row.raw and "prompt" not in row.raw and "messages" not in row.raw:
        # TRL's language-modelling rows: no prompt, every token is trained on.
        return {"prompt": "", "completion": row.answer("text")}
    if "messages" not in row.raw:
        return {"prompt": row.prompt(), "completion": row.answer("completion")}
    value = row.raw["messages"]
    if not isinstance(value, list):
        row.bad("messages", f"expected a message list, got {_type_name(value)}")
        return {}
    messages = row.messages("messages", value)
    if messages is None:
        return {}
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        row.bad("messages", "expected at least two messages, the last one from the assistant")
        return {}
    return {"prompt": messages[:-1], "completion": messages[-1]["content"]}


def split_shared_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any] | None:
    """TRL's implicit prompt: the longest shared prefix of two full texts (the space before
    the answers goes with them) or of two message lists; ``(prompt, chosen, rejected)``, or
    None when they share nothing or one contains the other."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        rest = (chosen[shared:], rejected[shared:])
        ok = shared and all(len(r) == 1 and r[0].get("role") == "assistant" for r in rest)
        return (chosen[:shared], rest[0][0]["content"], rest[1][0]["content"]) if ok else None
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        return None
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared and chosen[shared - 1] == " ":
        shared -= 1
    if not shared or shared in (len(chosen), len(rejected)):
        return None
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _implicit_prompt(row: _Row) -> dict[str, Any]:
    """A preference row without ``prompt``: the shared prefix of chosen and rejected is it."""
    chosen, rejected = row.raw.get("chosen"), row.raw.get("rejected")
    split = split_shared_prompt(chosen, rejected)
    if split is None:
        row.bad(
            "prompt",
            "missing field, and chosen/rejected share no prefix to take as the prompt "
            "(TRL's implicit prompt)",
        )
        return {}
    prompt, chosen_text, rejected_text = split
    return {
        "prompt": row.prompt_value("prompt", prompt),
        "chosen": row.string("chosen", chosen_text),
        "rejected": row.string("rejected", rejected_text),
    }


def _preference_row(row: _Row) -> dict[str, Any]:
    if "prompt" not in row.raw and "chosen" in row.raw and "rejected" in row.raw:
        out = _implicit_prompt(row)
    else:
        out = {
            "prompt": row.prompt(),
            "chosen": row.answer("chosen"),
            "rejected": row.answer("rejected"),
        }
    margin = row.number("margin", optional=True)
    if margin is not None:
        out["margin"] = margin
    return out


def _pku_safety(safe: bool, safer: bool) -> float:
    return (1.0 if safe else -1.0) + (0.5 if safer else -0.5)


def _safety_row(row: _Row) -> dict[str, Any]:
    prompt = row.prompt()
    if "response_0" not in row.raw and "response_1" not in row.raw and "chosen" not in row.raw:
        row.bad(
            "response_0",
            "missing field (PKU format needs response_0, response_1, better_response_id, "
            "safer_response_id, is_response_0_safe, is_response_1_safe; the flattened format "
            "needs chosen, rejected, chosen_safety, rejected_safety)",
        )
        return {}
    if "response_0" in row.raw or "response_1" in row.raw:
        responses = [row.answer("response_0"), row.answer("response_1")]
        better = row.response_id("better_response_id")
        safer = row.response_id("safer_response_id")
        safe = [row.boolean("is_response_0_safe"), row.boolean("is_response_1_safe")]
        if None in (better, safer, *safe):
            return {}
        if safe[0] != safe[1] and not safe[safer]:
            row.bad(
                "safer_response_id",
                f"points to response {safer}, marked unsafe, while the other is safe",
            )
            return {}
        scores = [_pku_safety(safe[i], i == safer) for i in (0, 1)]
        worse = 1 - better
        return {
            "prompt": prompt,
            "chosen": responses[better],
            "rejected": responses[worse],
            "chosen_safety": scores[better],
            "rejected_safety": scores[worse],
            "chosen_is_safe": safe[better],
            "rejected_is_safe": safe[worse],
        }
    out = {"prompt": prompt, "chosen": row.answer("chosen"), "rejected": row.answer("rejected")}
    for side in ("chosen", "rejected"):
        field = f"{side}_safety"
        value = row.raw.get(field, _MISSING)
        is_bool = isinstance(value, bool) or (
            row.text_cells and isinstance(value, str) and value.strip().lower() in ("true", "false")
        )
        score = (1.0 if row.boolean(field) else -1.0) if is_bool else row.number(field)
        out[field] = score
        out[f"{side}_is_safe"] = None if score is None else score >= 0
    return out


_NORMALIZERS = {
    "prompt": _prompt_row,
    "sft": _sft_row,
    "preference": _preference_row,
    "safety_preference": _safety_row,
    "rating": lambda row: {
        "prompt": row.prompt(),
        "response": row.answer("response"),
        "rating": row.number("rating"),
    },
}


def normalize_row(
    raw: Any, fmt: str, text_cells: bool = False
) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    """Validate one raw row against ``fmt``: ``(normalised row or None, [(field, problem)])``.

    ``text_cells=True`` (CSV) parses numbers and booleans from their text.
    """
    if fmt not in _NORMALIZERS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not isinstance(raw, Mapping):
        return None, [("<row>", f"expected an object, got {_type_name(raw)}")]
    row = _Row(raw, text_cells)
    out = _NORMALIZERS[fmt](row)
    if row.problems:
        return None, row.problems
    return out, []
