"""Gold tasks cannot be told from real ones by a client of the API.

Six annotators label a round with automatic gold through the HTTP API, taking turns. A client
records everything the API gives it (every field of every reply, flattened, and how each moves
from the annotator's previous claim), the time of each request, the order, and the *form* of
the texts (prefixes, suffixes, sentences repeated across tasks, texts or prompts seen before or
under another prompt). For each feature, and for a detector combining them all (fitted on three
annotators, tested on the other three), the area under the ROC curve for "gold" is compared
with its distribution when gold carries no information, obtained the way the design draws gold:
300 relabellings of the same claims that pick as many prompts at random and, in each, one of
its responses as the "donor" (claims of pairs holding it count as gold). The observed AUC must
lie within 4 standard deviations of that null's mean (the null's spread accounts for claims of
one prompt or task moving together). Before this fix `progress.available` and the automatic
gold's content (a fixed appended sentence, a word prefix of the partner) each scored AUC 1.0.

What remains is meaning: whether a response answers the prompt it is shown under, which is
what a gold pair asks an annotator to judge (gold.py). A program can approximate it from how
alike the two sides are (an answer to another prompt shares fewer words with its partner), so
those *relational* features (``RELATIONAL``) are measured and printed but held only to a loose
bound; an annotator who tells gold apart that way and answers the rest carelessly is caught by
agreement with the others (test_annotate_aggregation.py: the cheater who knows the gold).
"""

from __future__ import annotations

import asyncio
import difflib
import random
import re
import statistics
import time
import uuid
from collections import Counter, defaultdict
from typing import Any

import httpx
import numpy as np

from alignkit.annotate.assign import AssignConfig
from alignkit.annotate.db import open_database
from alignkit.annotate.gold import make_gold
from alignkit.annotate.ingest import NewResponse, add_annotator, add_responses, import_prompts
from alignkit.annotate.pairs import create_tasks
from alignkit.annotate.schema import Assignment, Prompt, Task
from alignkit.annotate.server import ServerConfig, create_app

NOUNS = [
    "cats",
    "rain",
    "tea",
    "chess",
    "bread",
    "rivers",
    "stars",
    "bicycles",
    "honey",
    "glaciers",
    "violins",
    "tomatoes",
    "owls",
    "copper",
    "tides",
    "maps",
    "salt",
    "kites",
    "moss",
    "lanterns",
    "whales",
    "pepper",
    "clocks",
    "deserts",
]
TOPICS = [f"{a} {n}" for a in ("old", "wild", "tiny", "northern") for n in NOUNS]  # 96
FILLER = [
    "It depends on the details",
    "Many people find this surprising",
    "Here is a short overview",
    "The history is long and varied",
    "Experts still disagree about parts of it",
    "A simple example helps",
    "Keep safety in mind",
    "This is a common question",
    "The answer has two parts",
    "Some sources say otherwise.",
]


def _response(topic: str, rng: random.Random) -> str:
    """A plausible answer about ``topic``: sentences of varied length and order."""
    facts = [
        f"{topic.capitalize()} have been studied for centuries",
        f"Most guides about {topic} start with the basics",
        f"You can learn a lot about {topic} by watching closely",
        f"The word {topic} has an old origin",
        f"People often ask how {topic} change over time",
        f"A good first step with {topic} is to ask an expert",
    ]
    sentences = rng.sample(facts, rng.randint(1, 3)) + rng.sample(FILLER, rng.randint(0, 4))
    rng.shuffle(sentences)
    return ". ".join(s.strip().rstrip(".") for s in sentences) + "."


def _round(url: str) -> tuple[Any, list[str]]:
    db = open_database(url)
    rng = random.Random(7)
    import_prompts(
        db,
        [
            {"prompt": f"Tell me something about {t}.", "category": ["a", "b"][i % 2]}
            for i, t in enumerate(TOPICS)
        ],
    )
    with db.write() as session:
        prompts = session.query(Prompt).order_by(Prompt.id).all()
        new = []
        for prompt, topic in zip(prompts, TOPICS, strict=True):
            for j in range(rng.choice([3, 4, 4])):
                settings = {"temperature": [0.7, 1.0][j % 2]}
                new.append(NewResponse(prompt.id, _response(topic, rng), f"m{j % 2}", settings, j))
        add_responses(session, new)
    assert make_gold(db, 24, seed=3) == 24
    # 3 pairs a prompt (every response in one at least): 432 claims, 78 of them gold. The null's
    # spread follows the prompts (the claims of one prompt move together) more than the claims:
    # 6 pairs a prompt (672 claims, 1.5 times the requests) narrowed its sd from 0.042 to 0.036
    report = create_tasks(db, annotators_per_task=2, max_pairs_per_prompt=3, mix={"random": 1.0})
    assert report.gold >= 35
    tokens = [add_annotator(db, f"ann{i}") for i in range(6)]
    return db, tokens


def _flatten(value: Any, prefix: str = "") -> dict[str, float]:
    """Every field of a JSON reply as a number: numbers as they are, text as its length, a list
    as its length (and its items), a missing value as -1."""
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for key, item in value.items():
            out |= _flatten(item, f"{prefix}{key}.")
        return out
    if isinstance(value, list):
        out = {f"{prefix}len": float(len(value))}
        for i, item in enumerate(value):
            out |= _flatten(item, f"{prefix}{i}.")
        return out
    if isinstance(value, bool):
        return {prefix[:-1]: float(value)}
    if isinstance(value, int | float):
        return {prefix[:-1]: float(value)}
    if isinstance(value, str):
        return {prefix[:-1]: float(len(value))}
    return {prefix[:-1]: -1.0}


def _prompt_text(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)


def _sentences(text: str) -> set[str]:
    return {s.strip().lower() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()}


async def _play(db: Any, tokens: list[str]) -> list[dict[str, Any]]:
    """The annotators take turns until nothing is left; one observation per claim. (The requests
    go to the app in this event loop: a TestClient spent more time handing each one to its own
    loop's thread than the app spent answering it.)"""
    app = create_app(
        db,
        ServerConfig(
            assign=AssignConfig(min_agreement=0.0), seed=1, rate_per_second=1e4, rate_burst=1e4
        ),
    )
    rng = random.Random(11)
    seen: list[dict[str, Any]] = []
    previous: dict[int, dict[str, float]] = {}
    open_ = set(range(len(tokens)))
    step = 0
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gold.test") as client:
        while open_:
            for i in sorted(open_):
                auth = {"Authorization": f"Bearer {tokens[i]}"}
                start = time.perf_counter()
                reply = await client.post("/api/next", headers=auth, json={})
                next_seconds = time.perf_counter() - start
                body = reply.json()
                if body["task"] is None:
                    open_.discard(i)
                    continue
                task = body["task"]
                start = time.perf_counter()
                label = await client.post(
                    f"/api/assignments/{task['assignment_id']}/label",
                    headers=auth,
                    json={
                        "idempotency_key": uuid.uuid4().hex,
                        "choice": rng.choice(["left", "right"]),
                        "confidence": 3,
                    }
                    | (
                        {"safer": "same", "left_safe": True, "right_safe": True}
                        if task["ask_safety"]
                        else {}
                    ),
                )
                label_seconds = time.perf_counter() - start
                me = (await client.get("/api/me", headers=auth)).json()
                fields = {f"next.{k}": v for k, v in _flatten(body).items()}
                fields |= {f"label.{k}": v for k, v in _flatten(label.json()).items()}
                fields |= {f"me.{k}": v for k, v in _flatten(me).items()}
                moved = {f"{k}.delta": v - previous.get(i, {}).get(k, v) for k, v in fields.items()}
                previous[i] = fields
                seen.append(
                    {
                        "annotator": i,
                        "assignment_id": task["assignment_id"],
                        "prompt": _prompt_text(task["prompt"]),
                        "left": task["left"],
                        "right": task["right"],
                        "fields": fields
                        | moved
                        | {
                            "time.next": next_seconds,
                            "time.label": label_seconds,
                            "order.step": step,
                        },
                    }
                )
                step += 1
    return seen


def _content_features(seen: list[dict[str, Any]]) -> None:
    """Add the form of the texts, judged over each annotator's whole history (a client may keep
    everything and decide at the end)."""
    texts: dict[int, Counter[str]] = defaultdict(Counter)
    prompts: dict[int, Counter[str]] = defaultdict(Counter)
    under: dict[int, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    sentence_count: Counter[str] = Counter()
    for obs in seen:
        i = obs["annotator"]
        prompts[i][obs["prompt"]] += 1
        for side in ("left", "right"):
            texts[i][obs[side]] += 1
            under[i][obs[side]].add(obs["prompt"])
            sentence_count.update(_sentences(obs[side]))
    # every sentence met in 5 different texts or more is a feature of its own ("a side says
    # it"): a fixed sentence added to gold, or one gold always keeps, would stand out here
    distinct = Counter(
        x for text in {t for c in texts.values() for t in c} for x in _sentences(text)
    )
    frequent = sorted(x for x, n in distinct.items() if n >= 5)
    order: dict[int, int] = Counter()
    for obs in seen:
        i, left, right = obs["annotator"], obs["left"], obs["right"]
        said = _sentences(left) | _sentences(right)
        obs["fields"] |= {f"sentence.{k}": float(x in said) for k, x in enumerate(frequent)}
        short, long_ = sorted((left, right), key=len)
        ls, rs = _sentences(left), _sentences(right)
        lw, rw = set(left.lower().split()), set(right.lower().split())
        common_prefix = len(__import__("os").path.commonprefix([left, right]))
        common_suffix = len(__import__("os").path.commonprefix([left[::-1], right[::-1]]))
        obs["fields"] |= {
            "form.prefix_of_partner": float(long_.startswith(short[: max(1, len(short) - 1)])),
            "form.word_prefix_of_partner": float(
                long_.split()[: len(short.split())] == short.split()
            ),
            "form.common_prefix_chars": float(common_prefix),
            "form.common_suffix_chars": float(common_suffix),
            "form.length_ratio": len(short) / max(1, len(long_)),
            "form.length_difference": float(len(long_) - len(short)),
            "form.shared_sentences": len(ls & rs) / max(1, len(ls | rs)),
            "form.same_sentences_reordered": float(ls == rs and left != right),
            "form.shared_words": len(lw & rw) / max(1, len(lw | rw)),
            "form.similarity": difflib.SequenceMatcher(None, left, right).ratio(),
            "form.most_repeated_sentence": float(max(sentence_count[s] for s in ls | rs)),
            "form.least_repeated_sentence": float(min(sentence_count[s] for s in ls | rs)),
            "history.prompt_seen": float(prompts[i][obs["prompt"]]),
            "history.text_seen_max": float(max(texts[i][left], texts[i][right])),
            "history.text_seen_min": float(min(texts[i][left], texts[i][right])),
            "history.text_under_other_prompts": float(
                len(under[i][left]) + len(under[i][right]) - 2
            ),
            "order.own_index": float(order[i]),
        }
        order[i] += 1


RELATIONAL = {
    "form.shared_sentences",
    "form.shared_words",
    "form.similarity",
    "form.length_ratio",
    "form.length_difference",
}


def _ranks(values: np.ndarray) -> np.ndarray:
    """The ranks 1..n of each column of ``values`` (n rows), ties given their average rank."""
    ranks = np.empty(values.shape)
    for j in range(values.shape[1]):
        order = np.argsort(values[:, j], kind="mergesort")
        _, first, count = np.unique(values[order, j], return_index=True, return_counts=True)
        ranks[order, j] = np.repeat(first + (count + 1) / 2, count)
    return ranks


def _aucs(ranks: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """P(a gold score > a real score) + 1/2 P(equal), the Mann-Whitney AUC, of every column of
    ``ranks`` (`_ranks` of the scores) for every labelling in the rows of ``gold`` (bool,
    labellings x scores): the rank sum of the gold scores, less its least value, over the pairs.
    The ranks do not depend on the labelling, so one matrix product scores all of them."""
    n_gold = gold.sum(1, keepdims=True)
    u = gold.astype(float) @ ranks - n_gold * (n_gold + 1) / 2
    return u / (n_gold * (gold.shape[1] - n_gold))


def _auc(scores: np.ndarray, gold: np.ndarray) -> float:
    return float(_aucs(_ranks(scores[:, None]), gold[None])[0, 0])


def _null(
    seen: list[dict[str, Any]], pairs: dict[int, tuple[int, int, int]], targets: int, rounds: int
) -> np.ndarray:
    """Gold labels drawn as the design draws them, from prompts that carry no gold: ``targets``
    random prompts, in each one random response as the donor (a row per round)."""
    rng = np.random.default_rng(0)
    by_prompt: dict[int, set[int]] = defaultdict(set)
    for prompt, a, b in pairs.values():
        by_prompt[prompt] |= {a, b}
    prompts = sorted(by_prompt)
    side_a = np.array([pairs[o["assignment_id"]][1] for o in seen])
    side_b = np.array([pairs[o["assignment_id"]][2] for o in seen])
    drawn = []
    for _ in range(rounds):
        chosen = rng.choice(prompts, size=targets, replace=False)
        donors = [int(rng.choice(sorted(by_prompt[p]))) for p in chosen]
        drawn.append(np.isin(side_a, donors) | np.isin(side_b, donors))
    return np.array(drawn)


def _within(observed: float, null: list[float]) -> bool:
    return abs(observed - statistics.fmean(null)) <= 4 * statistics.pstdev(null) + 1e-9


def _detector_auc(matrix: np.ndarray, label: np.ndarray, train: np.ndarray) -> float:
    """A linear detector (class-mean difference of standardised features) fitted on ``train``,
    its AUC on the rest."""
    mean, std = matrix[train].mean(0), matrix[train].std(0) + 1e-9
    z = (matrix - mean) / std
    direction = z[train & label].mean(0) - z[train & ~label].mean(0)
    scores = z @ direction
    return _auc(scores[~train], label[~train])


def test_a_client_watching_the_api_cannot_tell_gold_from_real(tmp_path) -> None:
    db, tokens = _round(f"sqlite:///{tmp_path / 'gold.db'}")
    seen = asyncio.run(_play(db, tokens))
    with db.read() as session:
        rows = (
            session.query(
                Assignment.id, Task.prompt_id, Task.response_a_id, Task.response_b_id, Task.is_gold
            )
            .join(Task, Task.id == Assignment.task_id)
            .all()
        )
    pairs = {r[0]: (r[1], r[2], r[3]) for r in rows if not r[4]}
    gold_assignments = {r[0] for r in rows if r[4]}
    targets = len({r[1] for r in rows if r[4]})
    _content_features(seen)
    is_gold = np.array([obs["assignment_id"] in gold_assignments for obs in seen])
    assert is_gold.sum() >= 70 and (~is_gold).sum() >= 300, (is_gold.sum(), (~is_gold).sum())
    names = sorted({k for obs in seen for k in obs["fields"]})
    assert {"next.progress.available", "next.progress.available.delta", "next.task.left"} <= set(
        names
    )
    matrix = np.array([[obs["fields"].get(k, -1.0) for k in names] for obs in seen])
    # the null: the real claims only, relabelled as the design would draw gold among them
    real = [obs for obs in seen if obs["assignment_id"] in pairs]
    real_matrix = matrix[~is_gold]
    nulls = _null(real, pairs, targets, rounds=300)
    observed = _aucs(_ranks(matrix), is_gold[None])[0]
    usable = nulls[(nulls.sum(1) > 0) & (nulls.sum(1) < nulls.shape[1])]
    null_aucs = _aucs(_ranks(real_matrix), usable)  # rounds x features
    telling, relational = {}, {}
    for j, name in enumerate(names):
        if name in RELATIONAL:
            relational[name] = round(float(observed[j]), 3)
            continue
        null = null_aucs[:, j].tolist()
        if not _within(float(observed[j]), null):
            telling[name] = (
                round(float(observed[j]), 3),
                round(statistics.fmean(null), 3),
                round(statistics.pstdev(null), 3),
            )
    assert not telling, f"features that tell gold apart (AUC, null mean, null sd): {telling}"
    print(f"gold {is_gold.sum()}, real {(~is_gold).sum()}; relational AUCs {relational}")
    assert all(abs(auc - 0.5) < 0.35 for auc in relational.values()), relational
    # every strict feature at once
    strict = [j for j, name in enumerate(names) if name not in RELATIONAL]
    train = np.array([obs["annotator"] < 3 for obs in seen])
    observed = _detector_auc(matrix[:, strict], is_gold, train)
    real_train = train[~is_gold]
    null = [_detector_auc(real_matrix[:, strict], g, real_train) for g in nulls[:100]]
    assert _within(observed, null), (observed, statistics.fmean(null), statistics.pstdev(null))
