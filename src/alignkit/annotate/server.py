"""`annotate serve`: the FastAPI app. Annotators label; admins run the round over HTTP too.

(No `from __future__ import annotations` here: FastAPI reads the dependency annotations of the
endpoints defined inside `create_app` at run time.)

Security: every API call carries ``Authorization: Bearer <token>`` (never a cookie, so a form on
another site cannot post on an annotator's behalf, and no CORS is enabled); POST bodies must be
JSON; tokens are looked up by hash and compared with ``hmac.compare_digest``; bodies over
``max_body_bytes`` get 413; each token has a token-bucket rate limit (429). Labels are committed
before the reply, and a client idempotency key makes a retried submission return the stored one.
Model output reaches the page only through ``textContent`` (static/app.js) under a CSP that
forbids inline scripts.
"""

import math
import random
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError, OperationalError

from alignkit.annotate import ingest
from alignkit.annotate.assign import (
    AssignConfig,
    LabelError,
    Submission,
    claim,
    progress,
    retry_conflicts,
    submit,
)
from alignkit.annotate.db import Database
from alignkit.annotate.export import export_rows
from alignkit.annotate.pairs import (
    DEFAULT_MIX,
    ORDERS,
    STRATEGIES,
    UNCERTAINTIES,
    create_tasks,
    uncertainty_scorer,
)
from alignkit.annotate.quality import QualityConfig, stats
from alignkit.annotate.schema import Annotator
from alignkit.errors import AlignkitError

__all__ = ["ServerConfig", "create_app"]

_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass
class ServerConfig:
    assign: AssignConfig = field(default_factory=AssignConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    max_body_bytes: int = 64 * 1024
    rate_per_second: float = 10.0  # sustained requests per token
    rate_burst: float = 60.0
    seed: int | None = None


class _Buckets:
    """Token buckets per key: ``rate`` refills per second, at most ``burst`` stored."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when allowed, else the seconds to wait."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._state.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._state[key] = (tokens - 1, now)
                return 0.0
            self._state[key] = (tokens, now)
            return (1 - tokens) / self.rate


class _BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is answered 413 before the app sees it."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks, size, more = [], 0, not too_big
        while more:
            message = await receive()
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


# ---------------------------------------------------------------- request bodies (validated)

_Strict = ConfigDict(extra="forbid")


class LabelBody(BaseModel):
    model_config = _Strict
    idempotency_key: str = Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")
    choice: Literal["left", "right", "tie"]
    confidence: int = Field(ge=1, le=5)
    reason: str = Field(default="", max_length=2000)
    safer: Literal["left", "right", "same"] | None = None
    left_safe: bool | None = None
    right_safe: bool | None = None


class RowsBody(BaseModel):
    model_config = _Strict
    rows: list[Any] = Field(min_length=1, max_length=10000)


class AnnotatorBody(BaseModel):
    model_config = _Strict
    name: str = Field(min_length=1, max_length=100)
    role: Literal["admin", "annotator"] = "annotator"


class TasksBody(BaseModel):
    model_config = _Strict
    num_prompts: int | None = Field(default=None, ge=1)
    annotators_per_task: int = Field(default=3, ge=1, le=100)
    max_pairs_per_prompt: int = Field(default=6, ge=1, le=1000)
    mix: dict[Literal[STRATEGIES], float] = Field(default_factory=lambda: dict(DEFAULT_MIX))  # type: ignore[valid-type]
    ask_safety: bool = False
    seed: int = 0
    by: Literal[ORDERS] = "strategy"  # type: ignore[valid-type]
    ensemble: str | None = Field(default=None, max_length=4096)  # a run directory on the server
    measure: Literal[UNCERTAINTIES] = "std"  # type: ignore[valid-type]


class GoldBody(BaseModel):
    model_config = _Strict
    rows: list[Any] = Field(default_factory=list, max_length=10000)
    auto: int = Field(default=0, ge=0, le=100000)
    kinds: list[Literal[ingest.GOLD_KINDS]] = Field(default_factory=lambda: list(ingest.GOLD_KINDS))  # type: ignore[valid-type]
    seed: int = 0


class GenerateBody(BaseModel):
    model_config = _Strict
    models: list[str] = Field(min_length=1, max_length=20)
    temperatures: list[float] = Field(default=[0.7, 1.0], min_length=1, max_length=10)
    samples: int = Field(default=2, ge=1, le=32)
    max_new_tokens: int = Field(default=128, ge=1, le=4096)
    seed: int = 0


def _finite(value: Any) -> Any:
    """JSON has no NaN: undefined statistics become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def create_app(db: Database, config: ServerConfig | None = None) -> FastAPI:
    """The labelling app over ``db`` (whose schema is already migrated by ``open_database``)."""
    config = config or ServerConfig()
    app = FastAPI(title="alignkit annotate", docs_url=None, redoc_url=None, openapi_url=None)
    buckets = _Buckets(config.rate_per_second, config.rate_burst)
    rng = random.Random(config.seed)
    rng_lock = threading.Lock()
    static = resources.files("alignkit.annotate") / "static"

    @app.middleware("http")
    async def _security_headers(request: Request, call_next: Any) -> Response:
        if request.method == "POST" and request.url.path.startswith("/api/"):
            ctype = request.headers.get("content-type", "").split(";")[0].strip()
            if ctype != "application/json":
                return JSONResponse(
                    {"detail": "POST bodies must be application/json"},
                    status_code=415,
                    headers=_HEADERS,
                )
        response = await call_next(request)
        response.headers.update(_HEADERS)
        return response

    @app.exception_handler(LabelError)
    async def _label_error(_request: Request, err: LabelError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.exception_handler(AlignkitError)
    async def _user_error(_request: Request, err: AlignkitError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=400)

    @app.exception_handler(OperationalError)
    async def _busy(_request: Request, err: OperationalError) -> JSONResponse:
        # a lock that outlasted the busy timeout, or a lost connection: nothing was committed
        return JSONResponse(
            {"detail": f"database busy, retry ({type(err.orig).__name__})"},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors()
        ]
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

    def annotator(authorization: Annotated[str | None, Header()] = None) -> Annotator:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(
                401,
                "sign in: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        wait = buckets.take(ingest.hash_token(token))
        if wait > 0:
            raise HTTPException(
                429,
                "too many requests for this token",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        with db.read() as session:
            found = ingest.find_annotator(session, token)
        if found is None:
            raise HTTPException(
                401, "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"}
            )
        return found

    def admin(who: Annotated[Annotator, Depends(annotator)]) -> Annotator:
        if who.role != "admin":
            raise HTTPException(403, "this needs an admin token")
        return who

    Who = Annotated[Annotator, Depends(annotator)]
    Admin = Annotated[Annotator, Depends(admin)]

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return Response(
            (static / "index.html").read_text(encoding="utf-8"),
            media_type="text/html; charset=utf-8",
        )

    @app.get("/app.js", include_in_schema=False)
    def script() -> Response:
        return Response(
            (static / "app.js").read_text(encoding="utf-8"),
            media_type="text/javascript; charset=utf-8",
        )

    @app.get("/api/me")
    def me(who: Who) -> dict[str, Any]:
        return {"name": who.name, "role": who.role, "progress": progress(db, who.id)}

    @app.post("/api/next")
    def next_task(who: Who) -> dict[str, Any]:
        with rng_lock:
            task_rng = random.Random(rng.random())
        served = retry_conflicts(claim, db, who.id, config.assign, task_rng)
        task = (
            None
            if served is None
            else {
                "assignment_id": served.assignment_id,
                "prompt": served.prompt,
                "left": served.left,
                "right": served.right,
                "ask_safety": served.ask_safety,
            }
        )
        return {"task": task, "progress": progress(db, who.id)}

    @app.post("/api/assignments/{assignment_id}/label")
    def label(assignment_id: int, body: LabelBody, who: Who) -> dict[str, Any]:
        sub = Submission(**body.model_dump())
        try:
            annotation_id, retry = retry_conflicts(
                submit, db, who.id, assignment_id, sub, config.assign
            )
        except IntegrityError:  # the same key raced in from a concurrent retry: answer as a retry
            annotation_id, retry = submit(db, who.id, assignment_id, sub, config.assign)
        return {"annotation_id": annotation_id, "duplicate": retry}

    @app.post("/api/admin/prompts")
    def admin_prompts(body: RowsBody, _: Admin) -> dict[str, int]:
        added, known = ingest.import_prompts(db, body.rows)
        return {"added": added, "already_present": known}

    @app.post("/api/admin/generate")
    def admin_generate(body: GenerateBody, _: Admin) -> dict[str, int]:
        from alignkit.annotate.generate import generate

        report = generate(
            db, body.models, body.temperatures, body.samples, body.max_new_tokens, seed=body.seed
        )
        return {
            "generated": report.generated,
            "added": report.added,
            "duplicates": report.duplicates,
        }

    @app.post("/api/admin/tasks")
    def admin_tasks(body: TasksBody, _: Admin) -> dict[str, Any]:
        options = body.model_dump()
        scorer = uncertainty_scorer(options.pop("by"), options.pop("ensemble"), options["measure"])
        report = create_tasks(db, scorer=scorer, **options)
        return {"prompts": report.prompts, "tasks": report.tasks, "by_strategy": report.by_strategy}

    @app.post("/api/admin/annotators")
    def admin_add(body: AnnotatorBody, _: Admin) -> dict[str, str]:
        return {
            "name": body.name,
            "role": body.role,
            "token": ingest.add_annotator(db, body.name, body.role),
        }

    @app.post("/api/admin/annotators/{name}/revoke")
    def admin_revoke(name: str, _: Admin) -> dict[str, str]:
        ingest.revoke_annotator(db, name)
        return {"revoked": name}

    @app.post("/api/admin/gold")
    def admin_gold(body: GoldBody, _: Admin) -> dict[str, int]:
        imported = ingest.import_gold(db, body.rows, seed=body.seed) if body.rows else 0
        made = ingest.make_gold(db, body.auto, body.kinds, seed=body.seed) if body.auto else 0
        return {"imported": imported, "made": made}

    @app.get("/api/admin/stats")
    def admin_stats(_: Admin) -> dict[str, Any]:
        return _finite(stats(db, config.quality))

    @app.get("/api/admin/export")
    def admin_export(
        _: Admin,
        safety: bool = False,
        min_labels: int = 1,
        min_agreement: float = 0.0,
        tie_margin: float = 0.0,
    ) -> PlainTextResponse:
        import json

        rows, _report = export_rows(
            db,
            safety=safety,
            min_labels=min_labels,
            min_agreement=min_agreement,
            tie_margin=tie_margin,
            quality=config.quality,
        )
        return PlainTextResponse(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
            media_type="application/x-ndjson",
        )

    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)  # outermost: before any parsing
    return app
