"""Database layer: creation, the versioned migration of an old database, refusals."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from annotate_helpers import DATA
from launch_helpers import free_port
from sqlalchemy import inspect, select, text

from alignkit.annotate.db import SCHEMA_VERSION, DatabaseError, open_database
from alignkit.annotate.schema import Annotation, Task


def _columns(db) -> dict[str, set[str]]:
    insp = inspect(db.engine)
    return {t: {c["name"] for c in insp.get_columns(t)} for t in insp.get_table_names()}


def test_a_new_database_is_created_at_the_current_version(db) -> None:
    assert db.schema_version() == SCHEMA_VERSION == 3
    assert {
        "prompts",
        "responses",
        "tasks",
        "assignments",
        "annotations",
        "annotators",
        "gold",
    } <= set(_columns(db))
    if db.dialect == "sqlite":
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_a_v1_database_opens_upgraded_with_its_rows_kept(tmp_path: Path) -> None:
    old = tmp_path / "v1.db"
    with sqlite3.connect(old) as conn:
        conn.executescript((DATA / "schema_v1.sql").read_text())
    db = open_database(str(old))
    fresh = open_database(str(tmp_path / "fresh.db"))
    assert db.schema_version() == SCHEMA_VERSION
    assert _columns(db) == _columns(fresh)  # the migration reaches exactly the fresh schema
    with db.read() as session:
        label = session.scalar(select(Annotation))
        task = session.scalar(select(Task))
    assert (label.idempotency_key, label.choice, label.confidence, label.safer) == (
        "key-1",
        "a",
        4,
        None,
    )
    assert task.ask_safety is False
    db2 = open_database(str(old))  # opening again is a no-op
    assert db2.schema_version() == SCHEMA_VERSION


def test_v2_gold_tasks_join_the_pool_on_upgrade(tmp_path: Path) -> None:
    # v2 served gold to everyone at a rate (target 0); v3 serves it like any task
    path = tmp_path / "v2.db"
    open_database(str(path)).dispose()
    with sqlite3.connect(path) as conn:
        conn.executescript(
            """
            INSERT INTO prompts (id, prompt_json, prompt_key, category, adversarial, high_value,
                flags_json, created_at, gold_donor) VALUES (1, '"p"', 'k', 'c', 0, 0, '{}', '2026-01-01', 0);
            INSERT INTO responses VALUES (1, 1, 'x', 'h1', 'model', 'm', '{}', 0, '2026-01-01');
            INSERT INTO responses VALUES (2, 1, 'y', 'h2', 'model', 'm', '{}', 0, '2026-01-01');
            INSERT INTO responses VALUES (3, 1, 'z', 'h3', 'gold', 'm', '{}', 0, '2026-01-01');
            INSERT INTO tasks VALUES (1, 1, 1, 2, 4, 0, 0, 0, 'random', 0, '2026-01-01');
            INSERT INTO tasks VALUES (2, 1, 1, 3, 0, 2, 2, 1, 'gold', 0, '2026-01-01');
            ALTER TABLE prompts DROP COLUMN gold_donor;
            UPDATE alignkit_schema SET version = 2;
            """
        )
    db = open_database(str(path))
    assert db.schema_version() == SCHEMA_VERSION
    with db.read() as session:
        assert dict(session.execute(select(Task.id, Task.target)).all()) == {1: 4, 2: 4}


def test_a_database_from_a_newer_alignkit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    open_database(str(path)).dispose()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alignkit_schema SET version = 99")
    with pytest.raises(DatabaseError, match="schema version 99 was written by a newer alignkit"):
        open_database(str(path))


def test_bad_urls_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="only sqlite:/// and postgresql://"):
        open_database("mysql://x/y")
    with pytest.raises(DatabaseError, match="in-memory SQLite"):
        open_database("sqlite://")
    with pytest.raises(DatabaseError, match="cannot open"):
        open_database(f"postgresql://nobody@127.0.0.1:{free_port()}/x")


def test_write_transactions_are_immediate_on_sqlite(tmp_path: Path) -> None:
    db = open_database(str(tmp_path / "l.db"))
    other = sqlite3.connect(tmp_path / "l.db", timeout=0)
    with db.write() as session:  # holds the write lock from its first statement
        session.execute(text("SELECT 1"))
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            other.execute("BEGIN IMMEDIATE")
    other.execute("BEGIN IMMEDIATE")
    other.rollback()
