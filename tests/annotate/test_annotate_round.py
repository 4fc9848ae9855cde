"""A labelling round through the library: pairs, prompt selection, claims, labels, gold, export."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
from annotate_helpers import seed_round, side_for, task_of
from sqlalchemy import func, select

from alignkit.annotate.assign import AssignConfig, LabelError, Submission, claim, submit
from alignkit.annotate.export import export_rows, write_export
from alignkit.annotate.gold import import_gold, make_gold
from alignkit.annotate.ingest import (
    add_annotator,
    find_annotator,
    import_prompts,
    revoke_annotator,
    rotate_token,
)
from alignkit.annotate.pairs import create_tasks, parse_mix, sample_pairs, select_prompts
from alignkit.annotate.quality import collect, stats
from alignkit.annotate.schema import Annotation, Annotator, Gold, Prompt, Response, Task
from alignkit.data.loaders import load_records
from alignkit.errors import AlignkitError, DataError

NO_GOLD = AssignConfig(min_agreement=0.0)  # no adaptive overlap here


def _responses(sources: list[str]) -> list[SimpleNamespace]:
    return [SimpleNamespace(id=i, model=s, settings_json="{}") for i, s in enumerate(sources)]


def test_three_responses_or_fewer_are_paired_exhaustively() -> None:
    pairs = sample_pairs(_responses(["m", "m", "n"]), max_pairs=1, rng=random.Random(0))
    assert sorted((a.id, b.id) for a, b in pairs) == [(0, 1), (0, 2), (1, 2)]


def test_smart_sampling_covers_every_response_different_sources_first() -> None:
    responses = _responses(["m", "m", "m", "n", "n", "n", "o"])
    for seed in range(20):
        pairs = sample_pairs(responses, max_pairs=4, rng=random.Random(seed))
        assert len(pairs) == 4 and len({(a.id, b.id) for a, b in pairs}) == 4
        assert {r.id for pair in pairs for r in pair} == set(range(7))
        # 7 responses, 3 sources: a cover of 4 pairs made only of different-source pairs exists
        assert all(a.model != b.model for a, b in pairs)
    with pytest.raises(AlignkitError, match="cannot cover 7 responses"):
        sample_pairs(responses, max_pairs=3, rng=random.Random(0))


def test_prompt_selection_follows_the_strategy_quotas() -> None:
    prompts = [
        SimpleNamespace(
            id=i, high_value=i < 10, adversarial=10 <= i < 13, category=["a", "b", "c"][i % 3]
        )
        for i in range(40)
    ]
    picked = select_prompts(
        prompts,
        {"a": 5, "b": 0, "c": 9},
        20,
        parse_mix("high_value=4,underrepresented=3,adversarial=2,random=1"),
        random.Random(0),
    )
    by = {
        s: [p for p, t in picked if t == s]
        for s in ("high_value", "underrepresented", "adversarial", "random")
    }
    assert {s: len(v) for s, v in by.items()} == {
        "high_value": 8,
        "underrepresented": 6,
        "adversarial": 3,  # quota 4, only 3 adversarial prompts: one goes to random
        "random": 3,
    }
    assert all(p.high_value for p in by["high_value"]) and all(
        p.adversarial for p in by["adversarial"]
    )
    assert [p.category for p in by["underrepresented"]].count(
        "b"
    ) >= 3  # the emptiest category first
    assert len({p.id for p, _ in picked}) == 20
    # too few adversarial prompts: the unused quota goes to random
    few = select_prompts(prompts, {}, 20, {"adversarial": 1.0}, random.Random(0))
    assert sum(t == "adversarial" for _, t in few) == 3 and len(few) == 20
    with pytest.raises(AlignkitError, match="unknown strategy 'popular'"):
        parse_mix("popular=1")


def test_import_prompts_reports_every_bad_row_and_keeps_flags(db) -> None:
    with pytest.raises(
        DataError,
        match=r"(?s)2 invalid row.*<request>:1: field 'prompt'.*<request>:2: field 'adversarial'",
    ):
        import_prompts(db, [{"prompt": ""}, {"prompt": "x", "adversarial": "yes"}])
    assert import_prompts(
        db,
        [
            {"prompt": "p", "category": "code", "adversarial": True, "source": "redteam"},
            {"prompt": "p"},
        ],
    ) == (1, 1)


def test_claims_never_repeat_a_task_and_respect_the_target(db) -> None:
    seed_round(db, n_prompts=3, annotators_per_task=2)  # 3 tasks, 2 annotators each
    ids = []
    for name in ("x", "y", "z"):
        add_annotator(db, name)
    with db.read() as s:
        ids = [a.id for a in s.scalars(select(Annotator).order_by(Annotator.id))]
    rng = random.Random(0)
    served = {i: [] for i in ids}
    for i in ids:
        while (task := claim(db, i, NO_GOLD, rng)) is not None:
            assert (
                claim(db, i, NO_GOLD, rng).assignment_id == task.assignment_id
            )  # the live lease again
            submit(
                db,
                i,
                task.assignment_id,
                Submission(f"k{i}-{task.assignment_id}", "left", 4),
                NO_GOLD,
            )
            served[i].append(task.assignment_id)
    with db.read() as s:
        per_task = s.execute(
            select(Annotation.task_id, func.count()).group_by(Annotation.task_id)
        ).all()
    assert sorted(c for _, c in per_task) == [2, 2, 2]
    assert [len(v) for v in served.values()] == [3, 3, 0]


def test_submissions_are_idempotent_and_scoped_to_their_owner(db) -> None:
    seed_round(db, n_prompts=2)
    add_annotator(db, "x")
    add_annotator(db, "y")
    rng = random.Random(0)
    task = claim(db, 1, NO_GOLD, rng)
    sub = Submission("key-1", "right", 5, "clearer")
    first = submit(db, 1, task.assignment_id, sub, NO_GOLD)
    assert submit(db, 1, task.assignment_id, sub, NO_GOLD) == (first[0], True)
    with pytest.raises(LabelError, match="already submitted"):
        submit(db, 1, task.assignment_id, Submission("key-2", "left", 5), NO_GOLD)
    with pytest.raises(LabelError, match="no assignment"):
        submit(db, 2, task.assignment_id, Submission("key-3", "left", 5), NO_GOLD)
    with pytest.raises(LabelError, match="idempotency_key was already used"):
        submit(db, 2, claim(db, 2, NO_GOLD, rng).assignment_id, sub, NO_GOLD)
    with db.read() as s:
        assert s.scalar(select(func.count(Annotation.id))) == 1


def test_expired_leases_return_to_the_pool(db) -> None:
    seed_round(db, n_prompts=1)
    add_annotator(db, "x")
    add_annotator(db, "y")
    short = AssignConfig(lease_seconds=1e-6)  # every lease has expired by the next claim
    rng = random.Random(0)
    first = claim(db, 1, short, rng)
    second = claim(db, 2, short, rng)  # x's lease expired: the slot is free again
    assert second is not None and second.left in (first.left, first.right)
    with pytest.raises(LabelError, match="lease expired"):
        submit(db, 1, first.assignment_id, Submission("late", "left", 3), short)
    with db.read() as s:
        assert s.scalar(select(Task.assigned)) == 1


def test_low_agreement_adds_an_annotator_up_to_the_cap(db) -> None:
    seed_round(db, n_prompts=1, annotators_per_task=2)
    for n in "abcd":
        add_annotator(db, n)
    config = AssignConfig(min_agreement=0.7, max_annotators=3)
    rng = random.Random(1)
    for annotator_id, want in zip((1, 2, 3), ("a", "b", "tie"), strict=True):
        task = claim(db, annotator_id, config, rng)
        side = side_for(db, task.assignment_id, want)
        submit(
            db, annotator_id, task.assignment_id, Submission(f"k{annotator_id}", side, 3), config
        )
    assert claim(db, 4, config, rng) is None  # capped at 3 although agreement stayed low
    with db.read() as s:
        assert s.scalar(select(Task.target)) == 3


def test_tokens_are_hashed_revocable_and_rotatable(db) -> None:
    token = add_annotator(db, "x", role="admin")
    with db.read() as s:
        stored = s.scalar(select(Annotator.token_hash))
        assert token not in stored and find_annotator(s, token).name == "x"
        assert find_annotator(s, token + "x") is None
    revoke_annotator(db, "x")
    with db.read() as s:
        assert find_annotator(s, token) is None
    with pytest.raises(AlignkitError, match=r"already exists.*rotate-token x"):
        add_annotator(db, "x")
    with pytest.raises(AlignkitError, match="--role 'boss'"):
        add_annotator(db, "y", role="boss")
    new, was_revoked = rotate_token(db, "x")  # a new token, the same annotator
    with db.read() as s:
        assert (
            was_revoked and find_annotator(s, new).name == "x" and find_annotator(s, token) is None
        )
    with pytest.raises(AlignkitError, match="no annotator named 'nobody'"):
        rotate_token(db, "nobody")


@pytest.mark.parametrize("name", ["eve\n", "eve\r", "\neve", "e ve", "ève", "x" * 101, ""])
def test_annotator_names_are_matched_in_full(db, name) -> None:
    with pytest.raises(AlignkitError, match="annotator name"):
        add_annotator(db, name)


@pytest.mark.parametrize("release", [revoke_annotator, lambda db, n: rotate_token(db, n)])
def test_revoking_or_rotating_frees_the_live_lease(db, release) -> None:
    seed_round(db, n_prompts=1, annotators_per_task=1)
    add_annotator(db, "x")
    add_annotator(db, "y")
    rng = random.Random(0)
    held = claim(db, 1, NO_GOLD, rng)
    assert claim(db, 2, NO_GOLD, rng) is None  # the only slot is x's
    release(db, "x")
    taken = claim(db, 2, NO_GOLD, rng)  # back in the pool at once, not after the 30-min lease
    assert taken is not None and {taken.left, taken.right} == {held.left, held.right}
    with pytest.raises(LabelError, match="lease expired"):
        submit(db, 1, held.assignment_id, Submission("late-key", "left", 3), NO_GOLD)
    with db.read() as s:
        assert s.scalar(select(Task.assigned)) == 1


def test_gold_pairs_are_real_responses_served_like_the_rest_and_score_annotators(db) -> None:
    import_prompts(db, [{"prompt": f"Question {i}?", "category": "c"} for i in range(6)])
    with db.write() as session:
        ids = [p for (p,) in session.execute(select(Prompt.id).order_by(Prompt.id))]
        from alignkit.annotate.ingest import NewResponse, add_responses

        add_responses(
            session,
            [
                NewResponse(p, f"Reply {j} about question {p}.", f"m{j}", {}, j)
                for p in ids
                for j in range(3)
            ],
        )
    assert make_gold(db, 2) == 2  # two prompts each lent a response of another (2 donors)
    assert (
        import_gold(
            db, [{"prompt": "2+2?", "chosen": "It is 4, since 2 + 2 = 4.", "rejected": "5"}]
        )
        == 1
    )
    report = create_tasks(db, annotators_per_task=1, mix={"random": 1.0})
    # 2 prompts donate (no tasks); 2 prompts with 3 replies (3 pairs); 2 where the donor takes
    # the place of one of their 3 replies (3 pairs, 2 of them gold); the imported pair
    assert (report.tasks, report.gold, report.prompts) == (2 * 3 + 2 * 3 + 1, 2 * 2 + 1, 4)
    with db.read() as s:
        model_texts = set(s.scalars(select(Response.text).where(Response.kind == "model")))
        donor_texts = set(s.scalars(select(Response.text).where(Response.kind == "donor")))
        donor_prompts = set(s.scalars(select(Prompt.id).where(Prompt.gold_donor.is_(True))))
        tasked = set(s.scalars(select(Task.prompt_id)))
        kinds = sorted(s.scalars(select(Gold.kind)))
    assert donor_texts <= model_texts  # a donor is a real response, unedited
    assert len(donor_prompts) == 2 and not donor_prompts & tasked  # shown under one prompt only
    assert kinds == ["imported"] + ["off_topic"] * 4
    add_annotator(db, "x")
    rng = random.Random(0)
    seen_gold = 0
    while (task := claim(db, 1, NO_GOLD, rng)) is not None:
        with db.read() as s:
            task_row = s.get(Task, task_of(db, task.assignment_id))
            answer = s.get(Gold, task_row.id)
        seen_gold += task_row.is_gold
        # the better response answers the prompt asked (its text names the prompt's id)
        own = f"question {task_row.prompt_id}."
        side = "left" if own in task.left or task.left.startswith("It is 4") else "right"
        submit(db, 1, task.assignment_id, Submission(f"k{task.assignment_id}", side, 5), NO_GOLD)
        if answer is not None:
            assert side_for(db, task.assignment_id, answer.answer) == side
    assert seen_gold == 5  # served in the pool like any task, each once
    result = stats(db)
    assert result["gold_tasks"] == 5 and result["annotators"]["x"]["gold_answered"] == 5
    assert result["annotators"]["x"]["gold_accuracy"] == result["gold_accuracy"] == 1.0
    rows, _ = export_rows(db)
    assert len(rows) == 2 * 3 + 2 * 1  # the real pairs only: no gold exported
    assert all(r["chosen"] not in donor_texts and r["rejected"] not in donor_texts for r in rows)


def test_export_weights_votes_by_quality_and_loads_for_dpo(db, tmp_path) -> None:
    seed_round(db, n_prompts=3, annotators_per_task=3)
    for n in "xyz":
        add_annotator(db, n)
    config = AssignConfig(min_agreement=0.0)
    rng = random.Random(0)
    # task 1: a, a, b; task 2: tie, tie, tie (dropped); task 3: a, b, tie (balanced: dropped)
    plan = {1: ["a", "a", "b"], 2: ["tie"] * 3, 3: ["a", "b", "tie"]}
    for annotator_id in (1, 2, 3):
        while (task := claim(db, annotator_id, config, rng)) is not None:
            task_id = task_of(db, task.assignment_id)
            side = side_for(db, task.assignment_id, plan[task_id][annotator_id - 1])
            submit(
                db,
                annotator_id,
                task.assignment_id,
                Submission(f"{annotator_id}-{task_id}", side, 5),
                config,
            )
    out = tmp_path / "prefs.jsonl"
    report = write_export(db, out)
    # task 3: x and y agree with each other as much as they disagree, so they weigh the same and
    # their votes cancel
    assert (report.rows, report.ties_dropped) == (1, 2)
    row = json.loads(out.read_text())
    weights = {i: e.weight for i, e in collect(db).estimates.items()}
    assert weights[1] == pytest.approx(weights[2]) and min(weights.values()) > 0
    log_odds = weights[1] + weights[2] - weights[3]  # confidence 5: full votes
    assert row["margin"] == pytest.approx(math.tanh(log_odds / 2), abs=1e-6)
    assert row["provenance"]["p_chosen"] == pytest.approx(1 / (1 + math.exp(-log_odds)), abs=1e-6)
    assert row["provenance"]["annotators"] == 3 and row["provenance"]["agreement"] == pytest.approx(
        2 / 3
    )
    assert any("no gold pairs" in w for w in report.warnings)  # the evidence is thin: said so
    records = load_records(out, "preference")
    assert len(records) == 1 and records[0]["margin"] == pytest.approx(row["margin"])


def test_vote_weights_can_overturn_a_majority() -> None:
    from alignkit.annotate.quality import TaskResult, aggregate

    labels = [SimpleNamespace(choice=c, confidence=5) for c in ("a", "a", "b")]
    # two light votes for a against one heavy vote for b: L = 0.3 + 0.3 - 0.9 = -0.3, so b wins
    # with margin tanh(0.15) = 0.149; weighted agreement 0.9 / 1.5 = 0.6
    result = TaskResult(task=None, labels=labels, votes=[0.3, 0.3, 0.9])
    assert result.log_odds == pytest.approx(-0.3) and result.margin == pytest.approx(
        math.tanh(0.15)
    )
    assert aggregate(result) == "b" and aggregate(result, tie_margin=0.15) is None
    assert result.weighted_agreement == pytest.approx(0.6) and result.agreement == pytest.approx(
        2 / 3
    )


def test_stats_measure_position_and_length_bias(db) -> None:
    seed_round(db, n_prompts=6)  # response 1 of each prompt is the longer one
    add_annotator(db, "x")
    rng = random.Random(3)
    longer_left = []
    while (task := claim(db, 1, NO_GOLD, rng)) is not None:  # always picks the left response
        longer_left.append(len(task.left) > len(task.right))
        submit(db, 1, task.assignment_id, Submission(f"k{task.assignment_id}", "left", 3), NO_GOLD)
    report = stats(db)
    assert (
        report["left_choice_rate"] == 1.0 and report["annotators"]["x"]["left_choice_rate"] == 1.0
    )
    assert report["longer_chosen_rate"] == pytest.approx(sum(longer_left) / 6)
    assert 0 < sum(longer_left) < 6  # the sides really were randomised
    assert (
        report["labels"] == 6 and report["agreement_majority_share"] is None
    )  # one label per task


def test_deadlock_victims_are_retried_other_errors_are_not() -> None:
    from sqlalchemy.exc import OperationalError

    from alignkit.annotate.assign import retry_conflicts

    calls = []

    def flaky(code: str):
        calls.append(code)
        if len(calls) == 1:
            raise OperationalError("UPDATE ...", {}, SimpleNamespace(sqlstate=code))
        return "ok"

    assert retry_conflicts(flaky, "40P01") == "ok" and len(calls) == 2
    calls.clear()
    with pytest.raises(OperationalError, match="UPDATE"):
        retry_conflicts(flaky, "08006")  # a lost connection is not retried here
    assert len(calls) == 1
