"""Transitivity augmentation of preference pairs (seed 002 §4.2.3 "transitivity_augmentation").

Per prompt, the pairs form a directed graph ``chosen -> rejected``. Responses on a cycle
(``a > b > c > a``: the judgements contradict each other) are reported and every edge inside
the cycle's strongly connected component is left out of the propagation, so no inference rests
on contradictory judgements. On the remaining acyclic graph, each path ``a > ... > c`` of at
most ``max_hops`` judgements yields ``a > c`` with margin
``decay ** (hops - 1) * min(margins on the path)``. A derived pair is never added when the
input already judges the two responses (in either direction); being derived from a DAG it
can never contradict an input judgement. Inputs without margins get margin 1.0 (so every
output row has one, as training requires); derived rows carry ``"source": "transitivity"``.

Unlike the seed, which sets every derived margin to 0.8 and propagates cycles, both are fixed.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from alignkit.data.validate import ValidatedRow

__all__ = ["AugmentResult", "transitive_pairs"]


@dataclass
class AugmentResult:
    rows: list[dict[str, Any]]
    added: int = 0
    cycles: list[dict[str, Any]] = field(default_factory=list)  # {"prompt", "responses", "rows"}


def _key(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _components(nodes: list[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan, iterative), each in discovery order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                out.append(sorted(component, key=nodes.index))
    return out


def transitive_pairs(
    rows: list[ValidatedRow], *, decay: float = 0.5, max_hops: int = 2
) -> AugmentResult:
    """The input rows (margin filled with 1.0 where absent) plus the derived pairs."""
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    if max_hops < 2:
        raise ValueError(f"max_hops must be >= 2, got {max_hops}")
    out = [dict(r.raw) | {"margin": r.record.get("margin", 1.0)} for r in rows]
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_prompt[_key(row.raw["prompt"])].append(i)
    result = AugmentResult(out)
    for members in by_prompt.values():
        text: dict[str, Any] = {}
        margin: dict[tuple[str, str], float] = {}
        edges: dict[str, set[str]] = defaultdict(set)
        for i in members:
            a, b = _key(rows[i].raw["chosen"]), _key(rows[i].raw["rejected"])
            text.setdefault(a, rows[i].raw["chosen"])
            text.setdefault(b, rows[i].raw["rejected"])
            edges[a].add(b)
            edges.setdefault(b, set())
            margin[(a, b)] = min(margin.get((a, b), float("inf")), out[i]["margin"])
        nodes = list(text)
        component_of: dict[str, int] = {}
        for c, component in enumerate(_components(nodes, edges)):
            for node in component:
                component_of[node] = c
            if len(component) > 1:
                inside = set(component)
                cycle_rows = [
                    rows[i].row
                    for i in members
                    if _key(rows[i].raw["chosen"]) in inside
                    and _key(rows[i].raw["rejected"]) in inside
                ]
                result.cycles.append(
                    {
                        "prompt": rows[members[0]].raw["prompt"],
                        "responses": [text[n] for n in component],
                        "rows": cycle_rows,
                    }
                )
        # Propagate on the acyclic part: drop edges inside a cycle's component, and ties
        # (margin 0), which order nothing.
        dag = {
            a: {b for b in edges[a] if component_of[a] != component_of[b] and margin[(a, b)] > 0}
            for a in nodes
        }
        judged = {frozenset(pair) for pair in margin}
        prompt = rows[members[0]].raw["prompt"]
        for start in nodes:
            # best (largest) margin of each reachable node within max_hops, breadth first
            frontier = {b: margin[(start, b)] for b in dag[start]}
            best: dict[str, tuple[float, int]] = {}
            for hops in range(2, max_hops + 1):
                nxt: dict[str, float] = {}
                for mid, m in frontier.items():
                    for end in dag[mid]:
                        value = min(m, margin[(mid, end)])
                        if value > nxt.get(end, float("-inf")):
                            nxt[end] = value
                for end, value in nxt.items():
                    if end not in best:
                        best[end] = (value, hops)
                frontier = nxt
            for end, (value, hops) in best.items():
                if frozenset((start, end)) in judged or end == start:
                    continue
                judged.add(frozenset((start, end)))
                result.rows.append(
                    {
                        "prompt": prompt,
                        "chosen": text[start],
                        "rejected": text[end],
                        "margin": round(decay ** (hops - 1) * value, 10),
                        "source": "transitivity",
                    }
                )
                result.added += 1
    return result
