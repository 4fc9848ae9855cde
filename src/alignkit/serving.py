"""An OpenAI-compatible HTTP server for a local model (``alignkit serve MODEL``).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (no streaming). Generation is alignkit's in-process engine
(``TransformersEngine.generate``); prompts are rendered and tokenised by ``prompts_from_records``,
exactly as for training: a completions ``prompt`` as plain text, chat ``messages`` through the
model's chat template with the generation prompt. One request is generated at a time (a lock);
requests are not batched together.

Request fields read: ``model`` (must be the served name), ``prompt`` (a string or a list of
strings) / ``messages``, ``max_tokens`` (chat: or ``max_completion_tokens``; default 16 for
completions as in OpenAI's API, ``default_max_tokens`` for chat), ``temperature`` (default 1; 0
is greedy), ``top_p``, ``top_k`` (vLLM's extension; 0 or -1 = off), ``n``, ``seed``, ``stop`` (a
string or a list; the text is cut before the first one). A field that would change the output
and is not supported (``logprobs``, ``presence_penalty`` ≠ 0, ``stream: true``, ...) is a 400
error naming it, never silently ignored. Errors have OpenAI's shape
``{"error": {"message", "type", "code"}}``; an unknown model is a 404.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["ServedModel", "background_server", "create_app"]

# Fields clients commonly send with their neutral value; any other value is refused.
_NEUTRAL = {
    "stream": (False, None),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (False, None),
    "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "user": None,  # any value: it does not change the output
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "stream_options": None,
}


class RequestError(Exception):
    """A request the server refuses: its HTTP status and OpenAI-style error type."""

    def __init__(self, message: str, status: int = 400, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


class ServedModel:
    """A model, its tokenizer and the engine that serves them, one generation at a time."""

    def __init__(
        self, model: Any, tokenizer: Any, name: str, *, default_max_tokens: int = 256
    ) -> None:
        from alignkit.rollout.engine import TransformersEngine

        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.engine = TransformersEngine(model, tokenizer)
        self.default_max_tokens = default_max_tokens
        config = getattr(model, "config", None)
        self.context_length = getattr(config, "max_position_embeddings", None)
        self._lock = threading.Lock()
        self._requests = 0

    def complete(self, body: dict[str, Any], chat: bool) -> dict[str, Any]:
        """The OpenAI response object for a completions (or chat completions) request body."""
        from alignkit.rollout import SamplingConfig, prompts_from_records

        self._check(body, chat)
        if chat:
            records = [{"prompt": _messages(body.get("messages"))}]
            default = self.default_max_tokens
            max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or default
        else:
            records = [{"prompt": p} for p in _prompts(body.get("prompt"))]
            max_tokens = body.get("max_tokens") or 16
        n = _integer(body, "n", 1, low=1)
        top_k = _integer(body, "top_k", 0, low=-1)
        try:
            sampling = SamplingConfig(
                max_new_tokens=int(max_tokens),
                samples_per_prompt=n,
                temperature=float(_number(body, "temperature", 1.0)),
                top_p=float(_number(body, "top_p", 1.0)),
                top_k=max(top_k, 0),
            )
        except (ValueError, TypeError) as err:
            raise RequestError(str(err)) from None
        prompts = prompts_from_records(records, self.tokenizer)
        longest = max(len(p.input_ids) for p in prompts)
        if self.context_length and longest + sampling.max_new_tokens > self.context_length:
            raise RequestError(
                f"This model's maximum context length is {self.context_length} tokens; the "
                f"prompt has {longest} and max_tokens is {sampling.max_new_tokens}"
            )
        stops = _stops(body.get("stop"))
        with self._lock:
            self._requests += 1
            seed = body.get("seed")
            seed = int(seed) if seed is not None else self._requests
            generator = torch.Generator().manual_seed(seed)
            exp = self.engine.generate(prompts, sampling, generator=generator)
        choices = []
        for i, text in enumerate(exp.completions):
            finish = "length" if bool(exp.truncated[i]) else "stop"
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            content = (
                {"message": {"role": "assistant", "content": text}}
                if chat
                else {
                    "text": text,
                    "logprobs": None,
                }
            )
            choices.append({"index": i, **content, "finish_reason": finish})
        prompt_tokens = sum(len(p.input_ids) for p in prompts)
        completion_tokens = int(exp.response_lengths.sum())
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _check(self, body: Any, chat: bool) -> None:
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        if body.get("model") != self.name:
            raise RequestError(
                f"The model `{body.get('model')}` does not exist (served: `{self.name}`)",
                404,
                "NotFoundError",
            )
        for key, neutral in _NEUTRAL.items():
            if key in body and neutral is not None and body[key] not in neutral:
                raise RequestError(f"'{key}' is not supported by alignkit serve")
        known = {"model", "n", "seed", "stop", "temperature", "top_p", "top_k", "max_tokens"}
        known |= {"messages", "max_completion_tokens"} if chat else {"prompt"}
        unknown = sorted(set(body) - known - set(_NEUTRAL))
        if unknown:
            raise RequestError(f"unsupported request field(s): {', '.join(unknown)}")


def _prompts(prompt: Any) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    raise RequestError("'prompt' must be a string or a non-empty list of strings")


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"each message needs a 'role' and a 'content': {m!r:.80}")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise RequestError("only text content parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise RequestError(f"message content must be a string: {m!r:.80}")
        out.append({"role": m["role"], "content": content})
    return out


def _stops(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("'stop' must be a string or a list of non-empty strings")
    return stops


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{key}' must be a number, got {value!r:.40}")
    return value


def _integer(body: dict[str, Any], key: str, default: int, low: int) -> int:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RequestError(f"'{key}' must be an integer >= {low}, got {value!r:.40}")
    return value


def create_app(served: ServedModel) -> Any:
    """The FastAPI application serving ``served``."""
    from fastapi import Body, FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI(title="alignkit serve", docs_url=None, redoc_url=None)

    def answer(body: Any, chat: bool) -> Any:
        try:
            return served.complete(body, chat)
        except RequestError as err:
            error = {"message": str(err), "type": err.kind, "code": err.status}
            return JSONResponse({"error": error}, status_code=err.status)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        card = {"id": served.name, "object": "model", "created": 0, "owned_by": "alignkit"}
        return {"object": "list", "data": [card]}

    # Sync handlers: FastAPI runs them in its thread pool, so generation never blocks the loop.
    @app.post("/v1/completions")
    def completions(body: Any = Body(...)) -> Any:
        return answer(body, chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions(body: Any = Body(...)) -> Any:
        return answer(body, chat=True)

    return app


@contextmanager
def background_server(served: ServedModel, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``served`` on a free port from a thread; yields its base URL (``.../v1``)."""
    import uvicorn

    config = uvicorn.Config(create_app(served), host=host, port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the alignkit server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
