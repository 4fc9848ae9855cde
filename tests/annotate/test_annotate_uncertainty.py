"""`annotate create-tasks --by uncertainty --ensemble RUN`: the pairs a reward-model ensemble is
least sure of are served first; a missing or unusable ensemble is a one-line error (exit 2)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from ensemble_helpers import train_tiny_ensemble
from fastapi.testclient import TestClient

from alignkit.annotate import pairs
from alignkit.annotate.assign import AssignConfig, Submission, claim, submit
from alignkit.annotate.db import Database, open_database
from alignkit.annotate.ingest import NewResponse, add_annotator, add_responses, import_prompts
from alignkit.annotate.schema import Annotator, Prompt, Task
from alignkit.annotate.server import ServerConfig, create_app
from alignkit.cli import main
from alignkit.models.ensemble import load_reward_source
from alignkit.ops.evaluation import UNCERTAINTIES, pair_uncertainty

WORDS = ["zorp", "quix", "blarg", "flum", "tesk", "vreen", "ogg", "plim", "snar", "dwex"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], set[frozenset]]:
    """``(ensemble run, candidate pairs, planted pairs)``: six in-distribution pairs every member
    ranks the same way, and three out-of-distribution pairs the members split their votes on
    (checked here on the members' own scores, so the planting does not rest on luck)."""
    root = tmp_path_factory.mktemp("uncertain")
    # The ensemble of tests/models/test_ensemble.py trained for 10 steps instead of 20 and
    # evaluated at the end only: what matters here is that the members agree on some pairs and
    # split on others, which is checked below on their own scores.
    run = train_tiny_ensemble(root, max_steps=10, eval_every=None)
    ensemble = load_reward_source(run)
    rows, seen = [], set()
    for line in (root / "data" / "preference_heldout.jsonl").read_text().splitlines():
        row = json.loads(line)
        if isinstance(row["prompt"], str) and row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)

    def votes_split(prompts: list, a: list[str], b: list[str]) -> list[bool]:
        margins = ensemble.member_scores(prompts, a) - ensemble.member_scores(prompts, b)
        return (pair_uncertainty(margins, "variance_ratio") > 0).tolist()

    agreed = [
        {"prompt": r["prompt"], "a": r["chosen"], "b": r["rejected"]}
        for r, split in zip(
            rows,
            votes_split(
                [r["prompt"] for r in rows],
                [r["chosen"] for r in rows],
                [r["rejected"] for r in rows],
            ),
            strict=True,
        )
        if not split
    ][:6]
    rng = random.Random(0)
    pool = [
        {
            "prompt": r["prompt"],
            "a": " ".join(rng.sample(WORDS, 5)),
            "b": " ".join(rng.sample(WORDS, 5)),
        }
        for r in rows[len(agreed) :]
    ]
    split = votes_split([p["prompt"] for p in pool], [p["a"] for p in pool], [p["b"] for p in pool])
    disputed = [p for p, s in zip(pool, split, strict=True) if s][:3]
    assert len(agreed) == 6 and len(disputed) == 3
    return run, disputed + agreed, {frozenset((p["a"], p["b"])) for p in disputed}


def _fill(db: Database, candidates: list[dict]) -> None:
    """One prompt per candidate with exactly its two responses (so exactly one task each)."""
    import_prompts(db, [{"prompt": c["prompt"]} for c in candidates])
    with db.write() as session:
        ids = {p.prompt_json: p.id for p in session.query(Prompt)}
        add_responses(
            session,
            [
                NewResponse(ids[json.dumps(c["prompt"])], text, model, {}, 0)
                for c in candidates
                for text, model in ((c["a"], "runs/a"), (c["b"], "runs/b"))
            ],
        )


def _served_order(db: Database, name: str = "ann") -> list[frozenset]:
    """Every task's pair, in the order a new annotator is served them."""
    add_annotator(db, name)
    with db.read() as session:
        annotator = session.query(Annotator).filter_by(name=name).one().id
    config = AssignConfig(min_agreement=0.0)
    order, rng = [], random.Random(0)
    while (task := claim(db, annotator, config, rng)) is not None:
        order.append(frozenset((task.left, task.right)))
        submit(db, annotator, task.assignment_id, Submission(f"k{len(order)}", "left", 3), config)
    return order


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    captured = capsys.readouterr()
    return info.value.code, captured.out + captured.err


def test_uncertain_pairs_are_served_first_from_the_cli(
    planted: tuple[Path, list[dict], set[frozenset]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run, candidates, disputed = planted
    orders = {}
    for by in ("strategy", "uncertainty"):
        db_path = str(tmp_path / f"{by}.db")
        _fill(open_database(db_path), candidates)
        args = ["annotate", "create-tasks", "--annotators-per-task", "1", "--db", db_path]
        if by == "uncertainty":
            args += ["--by", by, "--ensemble", str(run), "--measure", "variance_ratio"]
        code, text = _run(args, capsys)
        assert code == 0 and "created 9 tasks (0 gold) for 9 prompts" in text
        orders[by] = _served_order(open_database(db_path))
    assert len(orders["uncertainty"]) == 9 and set(orders["uncertainty"][:3]) == disputed
    # the control: without the ensemble (same seed) the disputed pairs are not all first
    assert set(orders["strategy"][:3]) != disputed and set(orders["strategy"]) == set(
        orders["uncertainty"]
    )


def test_served_order_follows_each_measure(
    planted: tuple[Path, list[dict], set[frozenset]], tmp_path: Path
) -> None:
    run, candidates, _ = planted
    ensemble = pairs.load_uncertainty_scorer(run)
    by_pair = {frozenset((c["a"], c["b"])): c for c in candidates}
    for measure in UNCERTAINTIES:
        db = open_database(f"sqlite:///{tmp_path / measure}.db")
        _fill(db, candidates)
        report = pairs.create_tasks(db, annotators_per_task=1, scorer=ensemble, measure=measure)
        assert report.tasks == 9
        served = [by_pair[p] for p in _served_order(db)]
        margins = ensemble.member_scores(
            [c["prompt"] for c in served], [c["a"] for c in served]
        ) - ensemble.member_scores([c["prompt"] for c in served], [c["b"] for c in served])
        # |margin| is symmetric in a/b, so the stored a/b order does not change any measure
        values = pair_uncertainty(margins, measure).tolist()
        assert values == sorted(values, reverse=True), measure


def test_admin_endpoint_orders_by_uncertainty(
    planted: tuple[Path, list[dict], set[frozenset]], tmp_path: Path
) -> None:
    run, candidates, disputed = planted
    db = open_database(f"sqlite:///{tmp_path / 'api.db'}")
    _fill(db, candidates)
    token = add_annotator(db, "boss", "admin")
    headers = {"Authorization": f"Bearer {token}"}
    body = {"annotators_per_task": 1, "by": "uncertainty", "measure": "variance_ratio"}
    elsewhere = TestClient(create_app(db, ServerConfig(seed=0, model_roots=(str(tmp_path),))))
    reply = elsewhere.post("/api/admin/tasks", headers=headers, json=body | {"ensemble": str(run)})
    assert reply.status_code == 400 and "not under a model root" in reply.json()["detail"]
    client = TestClient(create_app(db, ServerConfig(seed=0, model_roots=(str(run.parent),))))
    reply = client.post("/api/admin/tasks", headers=headers, json=body)
    assert (
        reply.status_code == 400 and "--by uncertainty needs --ensemble" in reply.json()["detail"]
    )
    reply = client.post("/api/admin/tasks", headers=headers, json=body | {"ensemble": str(run)})
    assert reply.status_code == 200 and reply.json()["tasks"] == 9
    order = _served_order(db)
    assert set(order[:3]) == disputed


def test_missing_or_unusable_ensemble_is_a_one_line_error(
    planted: tuple[Path, list[dict], set[frozenset]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run, candidates, _ = planted
    db_path = str(tmp_path / "e.db")
    _fill(open_database(db_path), candidates)
    base = ["annotate", "create-tasks", "--db", db_path]
    code, text = _run([*base, "--by", "uncertainty"], capsys)
    assert code == 2 and "--by uncertainty needs --ensemble RUN" in text
    assert "Traceback" not in text and len(text.strip().splitlines()) <= 2
    code, text = _run([*base, "--by", "votes"], capsys)
    assert code == 2 and "--by must be one of strategy, uncertainty" in text
    code, text = _run(
        [*base, "--by", "uncertainty", "--ensemble", str(run), "--measure", "iqr"], capsys
    )
    assert code == 2 and "--measure must be one of std, variance_ratio, entropy" in text
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    for config in broken.glob("member-*/checkpoints/*/model/tokenizer_config.json"):
        settings = json.loads(config.read_text())
        settings.pop("eos_token", None)
        config.write_text(json.dumps(settings))
    code, text = _run([*base, "--by", "uncertainty", "--ensemble", str(broken)], capsys)
    assert code == 2 and "has no eos_token_id; it cannot score responses" in text, text
    assert "Traceback" not in text
    with open_database(db_path).read() as session:  # nothing was created by any of these
        assert session.query(Task).count() == 0


def test_measures_match_the_ops_list() -> None:
    assert pairs.UNCERTAINTIES == UNCERTAINTIES
