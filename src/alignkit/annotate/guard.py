"""The server's defences that are not about labels: rate limits with bounded memory, the body
limit, closing connections that stall before their request head is complete (slow headers),
the access log (never a token), and confining the admin endpoints' model paths to roots."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

from fastapi.responses import JSONResponse

from alignkit.errors import ConfigError

__all__ = [
    "ACCESS_LOG",
    "LOG",
    "AccessLog",
    "BodyLimit",
    "Buckets",
    "confine_path",
    "header_timeout_protocol",
]

LOG = logging.getLogger("alignkit.annotate")
ACCESS_LOG = logging.getLogger("alignkit.annotate.access")


class Buckets:
    """Token buckets per key: ``rate`` refills per second, at most ``burst`` stored. At most
    ``max_keys`` keys are kept, the least recently used dropped first (a dropped key starts
    again full), so no sequence of requests grows the memory beyond that."""

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._state: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._state)

    def _level(self, key: Hashable, now: float) -> float:
        tokens, last = self._state.pop(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def wait(self, key: Hashable) -> float:
        """Seconds until ``key`` may go on (0 when it may now), without taking anything."""
        now = time.monotonic()
        with self._lock:
            if key not in self._state:
                return 0.0
            tokens = self._level(key, now)
            self._state[key] = (tokens, now)
            return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def take(self, key: Hashable) -> float:
        """Take one token: 0 when allowed, else the seconds to wait (nothing taken then)."""
        now = time.monotonic()
        with self._lock:
            tokens = self._level(key, now)
            allowed = tokens >= 1
            self._state[key] = (tokens - 1 if allowed else tokens, now)
            while len(self._state) > self.max_keys:
                self._state.popitem(last=False)
            return 0.0 if allowed else (1 - tokens) / self.rate


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is answered 413, and one that takes longer
    than ``seconds`` to arrive 408, before the app sees it."""

    def __init__(self, app: Any, limit: int, seconds: float) -> None:
        self.app, self.limit, self.seconds = app, limit, seconds

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks, size, more = [], 0, not too_big
        deadline = time.monotonic() + self.seconds
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                reply = JSONResponse(
                    {"detail": f"request body not received within {self.seconds:g} s"},
                    status_code=408,
                    headers={"Connection": "close"},
                )
                await reply(scope, receive, send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            chunks.append(chunk)
            more = message.get("more_body", False)
            if size > self.limit:
                too_big = True
                break
        if too_big:
            reply = JSONResponse(
                {"detail": f"request body over {self.limit} bytes"}, status_code=413
            )
            await reply(scope, receive, send)
            return
        body, sent = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


_SECRET = re.compile(r"ak_[A-Za-z0-9_-]+")
_SECRET_PARAM = re.compile(r"((?:^|&)[^=&]*(?:token|key|auth|pass)[^=&]*=)[^&]*", re.IGNORECASE)


class AccessLog:
    """ASGI middleware: one line per request on ``alignkit.annotate.access`` (client address,
    method, path, query with anything token-like replaced by ``***``, status, milliseconds,
    annotator name once signed in). Headers are never logged, so neither are tokens."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not ACCESS_LOG.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [0]

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            query = scope.get("query_string", b"").decode("latin-1")
            query = _SECRET.sub("***", _SECRET_PARAM.sub(r"\1***", query))
            client = scope.get("client") or ("-", 0)
            who = scope.get("state", {}).get("annotator", "-")
            ACCESS_LOG.info(
                '%s "%s %s%s" %d %.1fms %s',
                client[0],
                scope["method"],
                _SECRET.sub("***", scope["path"]),
                f"?{query}" if query else "",
                status[0],
                (time.perf_counter() - start) * 1000,
                who,
            )


def header_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request head is not complete within
    ``seconds`` of its first byte (or of the connection, when nothing comes): uvicorn itself
    waits for a head forever, so 1000 stalled sockets stay open (slowloris)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # still waiting for the rest of a request head
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expired(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


def confine_path(name: str, roots: Sequence[str], what: str) -> str:
    """``name`` if it is the built-in preset, a fetched model, or a path whose real location
    (symlinks followed) lies under one of ``roots``; otherwise a ConfigError that says the same
    whether or not the path exists."""
    from alignkit.models import fetch
    from alignkit.models.tiny import TINY_NAME

    if name == TINY_NAME or name in fetch.cached_models():
        return name
    real = os.path.realpath(os.path.expanduser(name))
    for root in roots:
        base = os.path.realpath(root)
        if os.path.commonpath([base, real]) == base:
            return name
    allowed = ", ".join(roots) if roots else "none configured"
    raise ConfigError(
        f"{what} {name!r}: not the preset or a fetched model, and not under a model root of "
        f"this server ({allowed}; `serve --model-root DIR`)"
    )
