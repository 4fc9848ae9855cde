"""`annotate create-tasks`: which prompts to label (strategy proportions, seed 002 §4.2) and which
pairs of their responses to compare (exhaustive for three or fewer, else smart sampling).

Gold (gold.py) joins here: a donor response lent to a prompt is paired like any response of
that prompt and each pair it lands in becomes a gold task (the other response is the better
one); imported gold pairs waiting for a task are put at random places among this call's tasks.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from alignkit.annotate.db import Database, utcnow
from alignkit.annotate.gold import pending_imported_gold
from alignkit.annotate.limits import check_number
from alignkit.annotate.schema import Gold, Prompt, Response, Task
from alignkit.errors import AlignkitError, ConfigError

if TYPE_CHECKING:  # torch-backed: imported only when a task order needs them
    from alignkit.data.select import MemberScorer
    from alignkit.models.ensemble import RewardEnsemble

UNCERTAINTIES = ("std", "variance_ratio", "entropy")  # alignkit.ops.evaluation, checked in tests

__all__ = [
    "DEFAULT_MIX",
    "ORDERS",
    "STRATEGIES",
    "TaskReport",
    "create_tasks",
    "load_uncertainty_scorer",
    "normalize_mix",
    "parse_mix",
    "sample_pairs",
    "select_prompts",
    "uncertainty_scorer",
]

STRATEGIES = ("high_value", "underrepresented", "adversarial", "random")
DEFAULT_MIX = {
    "high_value": 0.4,
    "underrepresented": 0.3,
    "adversarial": 0.2,
    "random": 0.1,
}  # seed 002


def parse_mix(text: str) -> dict[str, float]:
    """``"high_value=0.4,underrepresented=0.3,adversarial=0.2,random=0.1"`` -> shares summing to 1."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in STRATEGIES:
            raise AlignkitError(
                f"--mix: unknown strategy {name!r}; expected {', '.join(STRATEGIES)}"
            )
        try:
            mix[name] = float(value)
        except ValueError:
            raise AlignkitError(f"--mix: {part!r} is not strategy=share") from None
    return normalize_mix(mix)


def normalize_mix(mix: Mapping[str, float]) -> dict[str, float]:
    """Shares checked (finite, >= 0, some above 0) and scaled to sum to 1."""
    for name, share in mix.items():
        check_number(f"--mix: the share of {name}", share, 0, 1e6)
    total = sum(mix.values())
    if total <= 0:
        raise AlignkitError("--mix: the shares must add up to more than 0")
    return {k: v / total for k, v in mix.items()}


def select_prompts(
    prompts: Sequence[Prompt],
    tasks_per_category: Mapping[str, int],
    count: int,
    mix: Mapping[str, float],
    rng: random.Random,
) -> list[tuple[Prompt, str]]:
    """Pick ``count`` prompts, each tagged with the strategy that picked it.

    Quotas are ``floor(share * count)`` in the order of ``STRATEGIES`` with the remainder going to
    ``random``; a strategy with too few candidates hands its unused quota to ``random``.
    ``high_value`` takes prompts flagged high_value, ``adversarial`` those flagged adversarial,
    ``underrepresented`` goes round-robin over categories from the one with the fewest tasks.
    """
    left = list(prompts)
    rng.shuffle(left)
    count = min(count, len(left))
    quotas = {s: int(mix.get(s, 0.0) * count + 1e-9) for s in STRATEGIES}  # 1e-9: 0.29 * 100
    quotas["random"] += count - sum(quotas.values())
    picked: list[tuple[Prompt, str]] = []

    def take(candidates: list[Prompt], n: int, strategy: str) -> int:
        chosen = candidates[:n]
        ids = {p.id for p in chosen}
        left[:] = [p for p in left if p.id not in ids]
        picked.extend((p, strategy) for p in chosen)
        return n - len(chosen)

    spare = take([p for p in left if p.high_value], quotas["high_value"], "high_value")
    spare += take([p for p in left if p.adversarial], quotas["adversarial"], "adversarial")
    counts = Counter(tasks_per_category)
    by_category: dict[str, list[Prompt]] = {}
    for p in left:
        by_category.setdefault(p.category, []).append(p)
    round_robin = []
    for _ in range(quotas["underrepresented"]):
        open_categories = [c for c in by_category if by_category[c]]
        if not open_categories:
            break
        category = min(open_categories, key=lambda c: (counts[c], c))
        round_robin.append(by_category[category].pop())
        counts[category] += 1
    spare += take(round_robin, quotas["underrepresented"], "underrepresented")
    take(left[:], quotas["random"] + spare, "random")
    return picked


def _source(r: Response) -> tuple[str, str]:
    return (r.model, r.settings_json)


def sample_pairs(
    responses: Sequence[Response], max_pairs: int, rng: random.Random
) -> list[tuple[Response, Response]]:
    """All pairs for three responses or fewer; otherwise at most ``max_pairs`` pairs that cover every
    response, pairs of different sources (model or settings) first, then the rest at random."""
    if len(responses) <= 3:
        return list(itertools.combinations(responses, 2))
    need = (len(responses) + 1) // 2
    if max_pairs < need:
        raise AlignkitError(
            f"--max-pairs-per-prompt {max_pairs} cannot cover {len(responses)} responses (needs >= {need})"
        )
    all_pairs = list(itertools.combinations(responses, 2))
    rng.shuffle(all_pairs)
    all_pairs.sort(key=lambda pair: _source(pair[0]) == _source(pair[1]))  # stable: different first
    chosen: list[tuple[Response, Response]] = []
    covered: set[int] = set()
    for pair in all_pairs:  # cover: take a pair only when it covers two new responses
        if pair[0].id not in covered and pair[1].id not in covered:
            chosen.append(pair)
            covered |= {pair[0].id, pair[1].id}
    for r in responses:  # an odd one out: pair it with its first partner in the order above
        if r.id not in covered:
            chosen.append(next(p for p in all_pairs if r in p))
            covered.add(r.id)
    for pair in all_pairs:
        if len(chosen) >= max_pairs:
            break
        if pair not in chosen:
            chosen.append(pair)
    return (
        chosen[:max_pairs] if len(chosen) > max_pairs and len(covered) == len(responses) else chosen
    )


@dataclass(frozen=True)
class TaskReport:
    prompts: int
    tasks: int  # every task made, gold included
    by_strategy: dict[str, int]  # tasks made per strategy, gold included
    gold: int = 0  # gold tasks among them


ORDERS = ("strategy", "uncertainty")


def uncertainty_scorer(
    by: str, ensemble: str | Path | None, measure: str, device: str | None = None
) -> RewardEnsemble | None:
    """The scorer ``create_tasks`` orders by: None for ``--by strategy``, else the ensemble."""
    if by not in ORDERS:
        raise ConfigError(f"--by must be one of {', '.join(ORDERS)}, got {by!r}")
    if measure not in UNCERTAINTIES:
        raise ConfigError(f"--measure must be one of {', '.join(UNCERTAINTIES)}, got {measure!r}")
    if by == "strategy":
        if ensemble is not None:
            raise ConfigError("--ensemble is only used with --by uncertainty")
        return None
    if ensemble is None:
        raise ConfigError("--by uncertainty needs --ensemble RUN (an rm-ensemble run directory)")
    return load_uncertainty_scorer(ensemble, device)


def load_uncertainty_scorer(path: str | Path, device: str | None = None) -> RewardEnsemble:
    """An ensemble run (>= 2 members) whose every tokenizer can score, for ``--by uncertainty``."""
    from alignkit.models.ensemble import load_reward_source

    scorer = load_reward_source(path, device=device)
    if len(scorer) < 2:
        raise ConfigError(f"--ensemble {path}: uncertainty needs an ensemble of >= 2 members")
    for tokenizer, members in scorer.groups:
        missing = [
            n for n in ("pad_token_id", "eos_token_id") if getattr(tokenizer, n, None) is None
        ]
        if missing:
            names = ", ".join(scorer.names[k] for k in members)
            raise ConfigError(
                f"--ensemble {path}: the tokenizer of {names} has no {' or '.join(missing)}; "
                "it cannot score responses"
            )
    return scorer


@dataclass(frozen=True)
class _Planned:
    prompt_id: int
    strategy: str
    a: Response
    b: Response
    gold: str | None = None  # the better of a and b ("a" | "b") of a gold pair

    @property
    def response_ids(self) -> tuple[int, int]:
        return (self.a.id, self.b.id)


def _as_gold(
    prompt_id: int, strategy: str, x: Response, y: Response, rng: random.Random
) -> _Planned:
    """A gold pair, ``x`` the better response, on a random side of the stored pair."""
    if rng.random() < 0.5:
        return _Planned(prompt_id, strategy, x, y, "a")
    return _Planned(prompt_id, strategy, y, x, "b")


def _pair(prompt_id: int, strategy: str, x: Response, y: Response, rng: random.Random) -> _Planned:
    if x.kind == "donor":
        return _as_gold(prompt_id, strategy, y, x, rng)
    if y.kind == "donor":
        return _as_gold(prompt_id, strategy, x, y, rng)
    return _Planned(prompt_id, strategy, x, y)


def _plan(
    session: Session,
    num_prompts: int | None,
    max_pairs: int,
    mix: Mapping[str, float],
    rng: random.Random,
) -> tuple[list[_Planned], dict[int, Any]]:
    """The pairs to make, in serving order, and the prompts they belong to (decoded)."""
    has_tasks = select(Task.prompt_id)
    responses: dict[int, list[Response]] = {}
    for r in session.scalars(
        select(Response).where(Response.kind.in_(("model", "donor"))).order_by(Response.id)
    ):
        responses.setdefault(r.prompt_id, []).append(r)
    candidates = [
        p
        for p in session.scalars(
            select(Prompt)
            .where(Prompt.id.not_in(has_tasks), Prompt.gold_donor.is_(False))
            .order_by(Prompt.id)
        )
        if sum(r.kind == "model" for r in responses.get(p.id, ())) >= 2
    ]
    per_category = dict(
        session.execute(
            select(Prompt.category, func.count(Task.id))
            .join(Task, Task.prompt_id == Prompt.id)
            .where(Task.is_gold.is_(False))
            .group_by(Prompt.category)
        ).all()
    )
    count = len(candidates) if num_prompts is None else num_prompts
    planned = [
        _pair(prompt.id, strategy, a, b, rng)
        for prompt, strategy in select_prompts(candidates, per_category, count, mix, rng)
        for a, b in sample_pairs(_with_donor(responses[prompt.id], rng), max_pairs, rng)
    ]
    prompts = {p.id: json.loads(p.prompt_json) for p in candidates}
    return planned, prompts


def _with_donor(responses: list[Response], rng: random.Random) -> list[Response]:
    """A prompt's responses to pair. A lent donor takes the place of one of the prompt's own
    (left out at random), so a prompt with gold has as many responses, pairs and tasks as one
    without: otherwise the prompts with gold would be the ones an annotator meets more often."""
    donors = [r for r in responses if r.kind == "donor"]
    if not donors:
        return responses
    own = [r for r in responses if r.kind != "donor"]
    own.pop(rng.randrange(len(own)))
    return own + donors


def _interleave(
    planned: list[_Planned], imported: list[_Planned], rng: random.Random
) -> list[_Planned]:
    """``imported`` gold pairs at uniformly random places of ``planned`` (kept in its order)."""
    out = list(planned)
    for item in imported:
        out.insert(rng.randint(0, len(out)), item)
    return out


def create_tasks(
    db: Database,
    *,
    num_prompts: int | None = None,
    annotators_per_task: int = 3,
    max_pairs_per_prompt: int = 6,
    mix: Mapping[str, float] | None = None,
    ask_safety: bool = False,
    seed: int = 0,
    scorer: MemberScorer | None = None,
    measure: str = "std",
) -> TaskReport:
    """Make pair tasks for prompts that have >= 2 model responses and no tasks yet, with their
    gold pairs (module docstring); every task, gold or not, gets ``annotators_per_task``.

    Tasks are served in creation order (``assign._candidate``: tasks already partly assigned
    first, then by task id), so with a ``scorer`` (an ensemble, ``--by uncertainty``) this call's
    tasks are inserted most uncertain first by ``alignkit.data.select.select_uncertain``
    (``measure``: std, variance_ratio or entropy), gold pairs at random places (their own
    scores would sort them together); otherwise in the order prompts were picked. Scoring runs
    outside the write transaction, so annotators keep claiming meanwhile.
    """
    check_number("--annotators-per-task", annotators_per_task, 1, 100, integer=True)
    check_number("--max-pairs-per-prompt", max_pairs_per_prompt, 1, 1000, integer=True)
    if num_prompts is not None:
        check_number("--num-prompts", num_prompts, 1, integer=True)
    if measure not in UNCERTAINTIES:
        raise ConfigError(f"--measure must be one of {', '.join(UNCERTAINTIES)}, got {measure!r}")
    rng = random.Random(seed)
    with db.read() as session:
        planned, prompts = _plan(
            session, num_prompts, max_pairs_per_prompt, normalize_mix(mix or DEFAULT_MIX), rng
        )
        imported = [
            _as_gold(g.prompt_id, "gold", g.chosen, g.rejected, rng)
            for g in pending_imported_gold(session)
        ]
    if not planned:
        imported = []  # they wait for tasks to hide among
    if scorer is not None and planned:
        from alignkit.data.select import select_uncertain

        real = [t for t in planned if t.gold is None]
        imported += [t for t in planned if t.gold is not None]
        pairs = [
            ({"index": i}, {"prompt": prompts[t.prompt_id], "a": t.a.text, "b": t.b.text})
            for i, t in enumerate(real)
        ]
        ranked = select_uncertain(scorer, pairs, len(pairs), measure) if pairs else []
        planned = [real[row["index"]] for row in ranked]
    planned = _interleave(planned, imported, rng)
    made: Counter[str] = Counter()
    gold = 0
    with db.write() as session:
        # A create-tasks that ran while this one scored may have taken some of the prompts.
        taken = set(session.scalars(select(Task.prompt_id)))
        used = {
            i for t in session.scalars(select(Task)) for i in (t.response_a_id, t.response_b_id)
        }
        kept = [
            t
            for t in planned
            if (t.strategy == "gold" and not used & set(t.response_ids))
            or (t.strategy != "gold" and t.prompt_id not in taken)
        ]
        for t in kept:
            task = Task(
                prompt_id=t.prompt_id,
                response_a_id=t.a.id,
                response_b_id=t.b.id,
                target=annotators_per_task,
                assigned=0,
                submitted=0,
                is_gold=t.gold is not None,
                strategy=t.strategy,
                ask_safety=ask_safety,
                created_at=utcnow(),
            )
            session.add(task)
            if t.gold is not None:
                session.flush()
                kind = "imported" if t.strategy == "gold" else "off_topic"
                session.add(Gold(task_id=task.id, answer=t.gold, kind=kind))
                gold += 1
            made[t.strategy] += 1
    prompts_made = len({t.prompt_id for t in kept if t.strategy != "gold"})
    return TaskReport(
        prompts=prompts_made, tasks=sum(made.values()), by_strategy=dict(made), gold=gold
    )
