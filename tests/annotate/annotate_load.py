"""Load and crash harness for the labelling server: a real uvicorn process on a loopback port,
simulated annotators as threads, optional SIGKILL + restart of the server mid-load.

The full-size run whose figures docs/annotate.md reports (20 annotators x 500 submissions)::

    PYTHONPATH=src:tests .venv/bin/python tests/annotate/annotate_load.py --annotators 20 --per-annotator 500
    PYTHONPATH=src:tests .venv/bin/python tests/annotate/annotate_load.py --kill-after 5   # with a crash
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from launch_helpers import free_port
from sqlalchemy import func, select

from alignkit.annotate.db import open_database
from alignkit.annotate.ingest import NewResponse, add_annotator, add_responses, import_prompts
from alignkit.annotate.pairs import create_tasks
from alignkit.annotate.schema import Annotation, Prompt, Task

SRC = Path(__file__).resolve().parents[2] / "src"
_NETWORK = (httpx.TransportError, httpx.RemoteProtocolError)


def seed(url: str, annotators: int, per_annotator: int, per_task: int) -> list[str]:
    """Enough tasks for every annotator to label ``per_annotator`` pairs; returns the tokens."""
    db = open_database(url)
    n_tasks = annotators * per_annotator // per_task + annotators
    import_prompts(db, [{"prompt": f"load prompt {i}"} for i in range(n_tasks)])
    with db.write() as session:
        ids = [p.id for p in session.query(Prompt).order_by(Prompt.id)]
        add_responses(
            session,
            [NewResponse(p, f"response {j} to {p}", f"m{j}", {}, 0) for p in ids for j in (0, 1)],
        )
    create_tasks(db, annotators_per_task=per_task, mix={"random": 1.0})
    tokens = [add_annotator(db, f"load{i}") for i in range(annotators)]
    db.dispose()
    return tokens


class Server:
    """`alignkit annotate serve` in its own process (stopped by its pid)."""

    def __init__(self, url: str, port: int, extra: tuple[str, ...] = ()) -> None:
        self.url, self.port, self.proc, self.extra = url, port, None, extra
        self.base = f"http://127.0.0.1:{port}"

    def start(
        self, timeout: float = 120.0
    ) -> None:  # the CLI imports torch: slow on a busy machine
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        cmd = [
            sys.executable,
            "-m",
            "alignkit",
            "annotate",
            "serve",
            "--db",
            self.url,
            "--port",
            str(self.port),
            "--rate",
            "10000",
            "--min-agreement",
            "0",
            "--no-access-log",
            *self.extra,
        ]
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.base + "/", timeout=1).status_code == 200:
                    return
            except _NETWORK:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Result:
    acked: dict[str, int] = field(default_factory=dict)  # idempotency key -> annotation id
    sent: set[str] = field(default_factory=set)
    latencies: list[float] = field(default_factory=list)  # seconds per acknowledged label POST
    retried: int = 0
    duplicates: int = 0  # acknowledgements that said "this was a retry"
    elapsed: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def summary(self) -> dict[str, float]:
        lat = sorted(self.latencies)
        pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")  # noqa: E731
        return {
            "submissions": len(self.acked),
            "seconds": round(self.elapsed, 2),
            "submissions_per_s": round(len(self.acked) / self.elapsed, 1),
            "p50_ms": round(pct(0.5), 1),
            "p99_ms": round(pct(0.99), 1),
            "mean_ms": round(statistics.fmean(lat) * 1000, 1) if lat else float("nan"),
            "retried_requests": self.retried,
            "acknowledged_as_retry": self.duplicates,
        }


def _call(
    client: httpx.Client, result: Result, method: str, path: str, body: dict, deadline: float
) -> dict:
    """One request, retried (same body, so the same idempotency key) on network errors and 5xx."""
    while True:
        try:
            reply = client.request(method, path, json=body)
            if reply.status_code < 500:
                reply.raise_for_status()
                return reply.json()
        except _NETWORK:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no answer before the deadline")
        with result.lock:
            result.retried += 1
        time.sleep(0.1)


def annotator(base: str, token: str, count: int, result: Result, deadline: float) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
        for _ in range(count):
            task = _call(client, result, "POST", "/api/next", {}, deadline)["task"]
            if task is None:
                return
            key = uuid.uuid4().hex
            body = {
                "idempotency_key": key,
                "choice": ["left", "right", "tie"][hash(key) % 3],
                "confidence": 3,
            }
            with result.lock:
                result.sent.add(key)
            start = time.perf_counter()
            reply = _call(
                client,
                result,
                "POST",
                f"/api/assignments/{task['assignment_id']}/label",
                body,
                deadline,
            )
            with result.lock:
                result.latencies.append(time.perf_counter() - start)
                result.acked[key] = reply["annotation_id"]
                result.duplicates += reply["duplicate"]


def run(
    server: Server,
    tokens: list[str],
    per_annotator: int,
    kill_after: float | None = None,
    budget: float = 300.0,
    kill_at_label: int | None = None,
) -> Result:
    """Run the annotators against ``server``; SIGKILL and restart it once, ``kill_after`` seconds
    into the load or once ``kill_at_label`` labels are acknowledged (mid-load on any machine)."""
    result = Result()
    deadline = time.monotonic() + budget
    threads = [
        threading.Thread(target=annotator, args=(server.base, t, per_annotator, result, deadline))
        for t in tokens
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    if kill_after is not None:
        time.sleep(kill_after)
    if kill_at_label is not None:
        while len(result.acked) < kill_at_label and any(t.is_alive() for t in threads):
            time.sleep(0.005)
    if kill_after is not None or kill_at_label is not None:
        server.kill()
        server.start()
    for thread in threads:
        thread.join()
    result.elapsed = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotators", type=int, default=20)
    parser.add_argument("--per-annotator", type=int, default=500)
    parser.add_argument("--per-task", type=int, default=3)
    parser.add_argument("--kill-after", type=float, default=None)
    parser.add_argument("--db", default=None, help="database URL (default: a fresh SQLite file)")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        url = args.db or f"sqlite:///{tmp}/load.db"
        tokens = seed(url, args.annotators, args.per_annotator, args.per_task)
        server = Server(url, free_port())
        server.start()
        try:
            result = run(server, tokens, args.per_annotator, args.kill_after, budget=1800)
        finally:
            server.stop()
        db = open_database(url)
        with db.read() as session:
            stored = dict(session.execute(select(Annotation.idempotency_key, Annotation.id)).all())
            over = session.scalar(select(func.count()).where(Task.submitted > Task.target))
        db.dispose()
        lost = sum(stored.get(k) != v for k, v in result.acked.items())
        print(
            {
                **result.summary(),
                "stored": len(stored),
                "acknowledged_but_lost": lost,
                "tasks_over_target": over,
            }
        )


if __name__ == "__main__":
    main()
