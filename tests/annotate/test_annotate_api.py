"""The HTTP API through FastAPI's TestClient, on SQLite and PostgreSQL: auth, ownership, input
validation, limits, idempotency and the admin endpoints. Every refusal leaves the database as it was."""

from __future__ import annotations

import json

import pytest
from annotate_helpers import annotators, seed_round
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from alignkit.annotate.assign import AssignConfig
from alignkit.annotate.ingest import add_annotator
from alignkit.annotate.schema import Annotation, Assignment
from alignkit.annotate.server import ServerConfig, create_app
from alignkit.data.loaders import validate_records


def _client(db, **config) -> TestClient:
    base = {"assign": AssignConfig(min_agreement=0.0), "seed": 0}
    return TestClient(create_app(db, ServerConfig(**{**base, **config})))


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _counts(db) -> tuple[int, int]:
    with db.read() as s:
        return s.scalar(select(func.count(Annotation.id))), s.scalar(
            select(func.count(Assignment.id))
        )


def _good(key: str = "key-00001") -> dict:
    return {"idempotency_key": key, "choice": "left", "confidence": 4}


def test_sign_in_label_and_retry(db) -> None:
    seed_round(db, n_prompts=2)
    (token,) = annotators(db, 1)
    client = _client(db)
    me = client.get("/api/me", headers=_auth(token)).json()
    assert me == {"name": "ann0", "role": "annotator", "progress": {"done": 0, "available": 2}}
    task = client.post("/api/next", headers=_auth(token), json={}).json()["task"]
    assert set(task) == {"assignment_id", "prompt", "left", "right", "ask_safety"}
    url = f"/api/assignments/{task['assignment_id']}/label"
    first = client.post(url, headers=_auth(token), json=_good())
    again = client.post(url, headers=_auth(token), json=_good())
    assert first.status_code == again.status_code == 200
    assert again.json() == {"annotation_id": first.json()["annotation_id"], "duplicate": True}
    assert _counts(db) == (1, 1)
    assert client.get("/api/me", headers=_auth(token)).json()["progress"] == {
        "done": 1,
        "available": 1,
    }


def test_auth_failures_change_nothing(db) -> None:
    seed_round(db, n_prompts=2)
    token, other = annotators(db, 2)
    client = _client(db)
    task = client.post("/api/next", headers=_auth(token), json={}).json()["task"]
    url = f"/api/assignments/{task['assignment_id']}/label"
    before = _counts(db)
    cases = [
        ({}, 401, "sign in"),
        ({"Authorization": "Basic abc"}, 401, "sign in"),
        (_auth(token + "x"), 401, "unknown or revoked"),
        (_auth(other), 404, f"no assignment {task['assignment_id']} for you"),  # another's task
    ]
    for headers, status, message in cases:
        reply = client.post(url, headers=headers, json=_good())
        assert (reply.status_code, message in reply.json()["detail"]) == (status, True)
    assert client.get("/api/admin/stats", headers=_auth(token)).status_code == 403
    assert (
        client.post(
            "/api/admin/annotators", headers=_auth(token), json={"name": "evil"}
        ).status_code
        == 403
    )
    assert _counts(db) == before


def test_a_revoked_token_is_refused(db) -> None:
    seed_round(db, n_prompts=1)
    (token,) = annotators(db, 1)
    admin = add_annotator(db, "boss", role="admin")
    client = _client(db)
    task = client.post("/api/next", headers=_auth(token), json={}).json()["task"]
    assert client.post(
        "/api/admin/annotators/ann0/revoke", headers=_auth(admin), json={}
    ).json() == {"revoked": "ann0", "leases_released": 1}
    before = _counts(db)
    reply = client.post(
        f"/api/assignments/{task['assignment_id']}/label", headers=_auth(token), json=_good()
    )
    assert reply.status_code == 401 and "revoked" in reply.json()["detail"]
    assert client.post("/api/next", headers=_auth(token), json={}).status_code == 401
    assert _counts(db) == before


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({**_good(), "choice": "up"}, 422, "choice"),
        ({**_good(), "confidence": 9}, 422, "confidence"),
        ({**_good(), "idempotency_key": "short"}, 422, "idempotency_key"),
        ({**_good(), "admin": True}, 422, "admin: Extra inputs are not permitted"),
        ({**_good(), "reason": "x" * 2001}, 422, "reason"),
        ({"choice": "left"}, 422, "idempotency_key: Field required"),
        ("{not json", 422, "JSON"),
        ({**_good(), "reason": "x" * 70000}, 413, "request body over 65536 bytes"),
    ],
)
def test_malformed_and_oversized_input_is_refused(db, body, status, message) -> None:
    seed_round(db, n_prompts=1)
    (token,) = annotators(db, 1)
    client = _client(db)
    task = client.post("/api/next", headers=_auth(token), json={}).json()["task"]
    before = _counts(db)
    content = body if isinstance(body, str) else json.dumps(body)
    reply = client.post(
        f"/api/assignments/{task['assignment_id']}/label",
        headers={**_auth(token), "Content-Type": "application/json"},
        content=content,
    )
    assert reply.status_code == status and message in reply.json()["detail"]
    assert _counts(db) == before


def test_form_posts_and_unknown_assignments_are_refused(db) -> None:
    seed_round(db, n_prompts=1)
    (token,) = annotators(db, 1)
    client = _client(db)
    # a cross-site HTML form can only send form encodings: refused before any handler runs
    reply = client.post("/api/next", headers=_auth(token), data={"x": "1"})
    assert reply.status_code == 415
    assert (
        client.post("/api/assignments/999/label", headers=_auth(token), json=_good()).status_code
        == 404
    )
    assert (
        client.post("/api/assignments/abc/label", headers=_auth(token), json=_good()).status_code
        == 422
    )
    assert _counts(db) == (0, 0)


def test_rate_limit_per_token(db) -> None:
    (token, other) = annotators(db, 2)
    client = _client(db, rate_per_second=0.01, rate_burst=3)
    codes = [client.get("/api/me", headers=_auth(token)).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    assert client.get("/api/me", headers=_auth(other)).status_code == 200  # per token
    assert int(client.get("/api/me", headers=_auth(token)).headers["Retry-After"]) >= 1


def test_the_page_is_served_with_a_strict_policy(db) -> None:
    client = _client(db)
    page = client.get("/")
    assert page.status_code == 200 and 'src="/app.js"' in page.text and "<script>" not in page.text
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    script = client.get("/app.js")
    assert "textContent" in script.text and "innerHTML" not in script.text


def test_admin_endpoints_run_a_round(db) -> None:
    admin = add_annotator(db, "boss", role="admin")
    client = _client(db)
    h = _auth(admin)
    rows = [{"prompt": f"p{i}", "category": "c"} for i in range(2)]
    assert client.post("/api/admin/prompts", headers=h, json={"rows": rows}).json() == {
        "added": 2,
        "already_present": 0,
    }
    bad = client.post("/api/admin/prompts", headers=h, json={"rows": [{"prompt": 3}]})
    assert bad.status_code == 400 and "<request>:1: field 'prompt'" in bad.json()["detail"]
    gen = client.post(
        "/api/admin/generate",
        headers=h,
        json={"models": ["tiny"], "temperatures": [1.0], "samples": 3, "max_new_tokens": 6},
    )
    assert gen.status_code == 200 and gen.json()["added"] == 6
    # each lent response needs a second prompt without tasks: of two prompts, one lends
    assert client.post("/api/admin/gold", headers=h, json={"auto": 5}).json() == {
        "imported": 0,
        "lent": 1,
    }
    tasks = client.post(
        "/api/admin/tasks", headers=h, json={"annotators_per_task": 1, "mix": {"random": 1.0}}
    ).json()
    # the donor takes the place of one of the prompt's 3 replies: 3 pairs, 2 of them gold
    assert (tasks["tasks"], tasks["gold"]) == (3, 2)
    token = client.post("/api/admin/annotators", headers=h, json={"name": "new"}).json()["token"]
    task = client.post("/api/next", headers=_auth(token), json={}).json()["task"]
    client.post(
        f"/api/assignments/{task['assignment_id']}/label", headers=_auth(token), json=_good()
    )
    stats = client.get("/api/admin/stats", headers=h).json()
    assert stats["labels"] == 1 and stats["annotators"]["new"]["labels"] == 1
    export = client.get("/api/admin/export", headers=h)
    records = validate_records(
        [json.loads(line) for line in export.text.splitlines()], "preference"
    )
    assert len(records) == 1
    report = json.loads(export.headers["X-Alignkit-Export-Report"])  # thin evidence is said
    assert report["rows"] == 1 and report["without_evidence"] == 1
    assert any("without evidence of accuracy" in w for w in report["warnings"])
    rotated = client.post("/api/admin/annotators/new/rotate", headers=h, json={}).json()
    assert rotated["name"] == "new" and rotated["reinstated"] is False
    assert client.get("/api/me", headers=_auth(token)).status_code == 401  # the old one is dead
    assert client.get("/api/me", headers=_auth(rotated["token"])).json()["name"] == "new"
