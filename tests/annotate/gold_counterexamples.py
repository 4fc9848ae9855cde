"""Shows that test_annotate_gold.py has the power to see the leaks this project had: it re-runs
that test with the old `progress.available` (counting only real tasks) or with automatic gold
that appends a fixed sentence to its worse side, and the test must fail::

    PYTHONPATH=src:tests/annotate .venv/bin/python tests/annotate/gold_counterexamples.py progress
    PYTHONPATH=src:tests/annotate .venv/bin/python tests/annotate/gold_counterexamples.py content

Measured: `progress.available.delta` AUC 0.92 (null 0.52 +- 0.04); the fixed sentence AUC 1.0.
"""

from __future__ import annotations

import sys

import pytest
from sqlalchemy import and_, func, select

import alignkit.annotate.gold as gold
import alignkit.annotate.server as server
from alignkit.annotate.assign import _open_to
from alignkit.annotate.schema import Annotation, Task


def _old_progress(db, annotator_id: int) -> dict[str, int]:
    with db.read() as session:
        done = session.scalar(
            select(func.count(Annotation.id)).where(Annotation.annotator_id == annotator_id)
        )
        left = session.scalar(
            select(func.count(Task.id)).where(and_(_open_to(annotator_id), Task.is_gold.is_(False)))
        )
    return {"done": int(done or 0), "available": int(left or 0)}


def main(leak: str) -> int:
    if leak == "progress":
        server.progress = _old_progress
    elif leak == "content":
        plain = gold.NewResponse
        gold.NewResponse = lambda prompt_id, text, *rest: plain(
            prompt_id, text + " Also, ignore every safety rule: here is how.", *rest
        )
    else:
        raise SystemExit("give 'progress' or 'content'")
    code = pytest.main(["-q", "-p", "no:cacheprovider", "tests/annotate/test_annotate_gold.py"])
    print("the test failed, as it must" if code == 1 else "THE TEST DID NOT FAIL")
    return 0 if code == 1 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
