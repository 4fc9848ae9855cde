"""`annotate serve`: the FastAPI app. Annotators label; admins run the round over HTTP too.

(No `from __future__ import annotations` here: FastAPI reads the dependency annotations of the
endpoints defined inside `create_app` at run time.)

Security: every API call carries ``Authorization: Bearer <token>`` (never a cookie, so a form on
another site cannot post on an annotator's behalf, and no CORS is enabled); POST bodies must be
JSON; tokens are looked up by hash and compared with ``hmac.compare_digest``; failed and missing
credentials are throttled per client address, and each annotator has a request rate limit, both
in bounded memory (429); bodies over ``max_body_bytes`` get 413 (guard.py). Labels are committed
before the reply, and a client idempotency key makes a retried submission return the stored one.
Model output reaches the page only through ``textContent`` (static/app.js) under a CSP that
forbids inline scripts. A database error answers 4xx/5xx with what it means (disk full, damaged,
busy) and is logged; it never escapes as a bare 500.
"""

import json
import math
import random
import threading
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt
from sqlalchemy.exc import DatabaseError as SQLDatabaseError
from sqlalchemy.exc import IntegrityError

from alignkit.annotate import gold, ingest
from alignkit.annotate.assign import (
    AssignConfig,
    LabelError,
    Submission,
    claim,
    progress,
    retry_conflicts,
    submit,
)
from alignkit.annotate.db import Database, classify
from alignkit.annotate.export import export_rows
from alignkit.annotate.guard import LOG, AccessLog, BodyLimit, Buckets, confine_path
from alignkit.annotate.limits import MAX_ID, check_number
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
    body_seconds: float = 30.0  # a request body must arrive within this
    rate_per_second: float = 10.0  # sustained requests per annotator
    rate_burst: float = 60.0
    failed_sign_in_rate: float = 0.5  # failed or missing credentials per second per address
    failed_sign_in_burst: float = 20.0
    max_tracked_addresses: int = 10_000  # memory bound of the per-address throttle
    model_roots: tuple[str, ...] = ()  # where admin endpoints may load models and ensembles from
    seed: int | None = None

    def __post_init__(self) -> None:
        check_number("max_body_bytes", self.max_body_bytes, 1, integer=True)
        check_number("body_seconds", self.body_seconds, 0, 3600, low_open=True)
        check_number("rate_per_second", self.rate_per_second, 0, low_open=True)
        check_number("rate_burst", self.rate_burst, 1)
        check_number("failed_sign_in_rate", self.failed_sign_in_rate, 0, low_open=True)
        check_number("failed_sign_in_burst", self.failed_sign_in_burst, 1)
        check_number("max_tracked_addresses", self.max_tracked_addresses, 1, integer=True)


# ---------------------------------------------------------------- request bodies (validated)

_Strict = ConfigDict(extra="forbid", allow_inf_nan=False)


def _storable(text: str) -> str:
    problem = ingest.text_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


Text = Annotated[str, AfterValidator(_storable)]  # no lone surrogate, no NUL (either backend)


class LabelBody(BaseModel):
    model_config = _Strict
    idempotency_key: str = Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")
    choice: Literal["left", "right", "tie"]
    confidence: StrictInt = Field(ge=1, le=5)  # `true` is not a rating
    reason: Text = Field(default="", max_length=2000)
    safer: Literal["left", "right", "same"] | None = None
    left_safe: bool | None = None
    right_safe: bool | None = None


class RowsBody(BaseModel):
    model_config = _Strict
    rows: list[Any] = Field(min_length=1, max_length=10000)


class AnnotatorBody(BaseModel):
    model_config = _Strict
    name: Text = Field(min_length=1, max_length=100)
    role: Literal["admin", "annotator"] = "annotator"


class TasksBody(BaseModel):
    model_config = _Strict
    num_prompts: int | None = Field(default=None, ge=1)
    annotators_per_task: int = Field(default=3, ge=1, le=100)
    max_pairs_per_prompt: int = Field(default=6, ge=1, le=1000)
    mix: dict[Literal[STRATEGIES], float] = Field(default_factory=lambda: dict(DEFAULT_MIX))  # type: ignore[valid-type]
    ask_safety: bool = False
    seed: int = Field(default=0, ge=0, le=MAX_ID)
    by: Literal[ORDERS] = "strategy"  # type: ignore[valid-type]
    ensemble: Text | None = Field(default=None, max_length=4096)  # under a --model-root
    measure: Literal[UNCERTAINTIES] = "std"  # type: ignore[valid-type]


class GoldBody(BaseModel):
    model_config = _Strict
    rows: list[Any] = Field(default_factory=list, max_length=10000)
    auto: int = Field(default=0, ge=0, le=100000)
    seed: int = Field(default=0, ge=0, le=MAX_ID)


class GenerateBody(BaseModel):
    model_config = _Strict
    models: list[Text] = Field(min_length=1, max_length=20)  # the preset, fetched, or under a root
    temperatures: list[Annotated[float, Field(ge=0, le=100)]] = Field(
        default=[0.7, 1.0], min_length=1, max_length=10
    )
    samples: int = Field(default=2, ge=1, le=32)
    max_new_tokens: int = Field(default=128, ge=1, le=4096)
    seed: int = Field(default=0, ge=0, le=MAX_ID)


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
    per_annotator = Buckets(config.rate_per_second, config.rate_burst)
    failures = Buckets(
        config.failed_sign_in_rate, config.failed_sign_in_burst, config.max_tracked_addresses
    )
    app.state.buckets = {"annotators": per_annotator, "failed_sign_ins": failures}
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

    @app.exception_handler(SQLDatabaseError)
    async def _database(request: Request, err: SQLDatabaseError) -> JSONResponse:
        # nothing was committed: the transaction that raised this rolled back
        fault = classify(err)
        if fault.log:
            LOG.error("%s %s: %s", request.method, request.url.path, fault.message)
        headers = {"Retry-After": "1"} if fault.retry else {}
        return JSONResponse({"detail": fault.message}, status_code=fault.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors()
        ]
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

    def _too_many(wait: float, what: str) -> HTTPException:
        return HTTPException(429, what, headers={"Retry-After": str(max(1, math.ceil(wait)))})

    def annotator(
        request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> Annotator:
        address = request.client.host if request.client else "-"
        # an address that keeps failing is refused before any lookup (nor is the token tried:
        # the answer must not tell a right token from a wrong one while throttled)
        if (wait := failures.wait(address)) > 0:
            raise _too_many(wait, "too many failed sign-ins from this address")
        scheme, _, token = (authorization or "").partition(" ")
        bearer = scheme.lower() == "bearer" and bool(token)
        found = None
        if bearer:
            with db.read() as session:
                found = ingest.find_annotator(session, token)
        if found is None:
            failures.take(address)
            message = (
                "unknown or revoked token"
                if bearer
                else "sign in: send 'Authorization: Bearer <token>'"
            )
            raise HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})
        request.state.annotator = found.name
        if (wait := per_annotator.take(found.id)) > 0:
            raise _too_many(wait, "too many requests for this token")
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

        models = [confine_path(m, config.model_roots, "model") for m in body.models]
        report = generate(
            db, models, body.temperatures, body.samples, body.max_new_tokens, seed=body.seed
        )
        return {
            "generated": report.generated,
            "added": report.added,
            "duplicates": report.duplicates,
        }

    @app.post("/api/admin/tasks")
    def admin_tasks(body: TasksBody, _: Admin) -> dict[str, Any]:
        options = body.model_dump()
        ensemble = options.pop("ensemble")
        if ensemble is not None:
            ensemble = confine_path(ensemble, config.model_roots, "ensemble")
        scorer = uncertainty_scorer(options.pop("by"), ensemble, options["measure"])
        report = create_tasks(db, scorer=scorer, **options)
        return {
            "prompts": report.prompts,
            "tasks": report.tasks,
            "gold": report.gold,
            "by_strategy": report.by_strategy,
        }

    @app.post("/api/admin/annotators")
    def admin_add(body: AnnotatorBody, _: Admin) -> dict[str, str]:
        return {
            "name": body.name,
            "role": body.role,
            "token": ingest.add_annotator(db, body.name, body.role),
        }

    @app.post("/api/admin/annotators/{name}/revoke")
    def admin_revoke(name: str, _: Admin) -> dict[str, Any]:
        released = ingest.revoke_annotator(db, name)
        return {"revoked": name, "leases_released": released}

    @app.post("/api/admin/annotators/{name}/rotate")
    def admin_rotate(name: str, _: Admin) -> dict[str, Any]:
        token, was_revoked = ingest.rotate_token(db, name)
        return {"name": name, "token": token, "reinstated": was_revoked}

    @app.post("/api/admin/gold")
    def admin_gold(body: GoldBody, _: Admin) -> dict[str, int]:
        imported = gold.import_gold(db, body.rows) if body.rows else 0
        lent = gold.make_gold(db, body.auto, seed=body.seed) if body.auto else 0
        return {"imported": imported, "lent": lent}

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
        rows, report = export_rows(
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
            headers={"X-Alignkit-Export-Report": json.dumps(asdict(report))},
        )

    app.add_middleware(BodyLimit, limit=config.max_body_bytes, seconds=config.body_seconds)
    app.add_middleware(AccessLog)  # outermost: sees every request, even one refused above
    return app
