"""The labelling database: engine set-up for SQLite (default) and PostgreSQL, and versioned
migrations run by the server itself, so a database written by an older alignkit opens.

SQLite runs in WAL mode with a busy timeout; every *write* transaction starts with
``BEGIN IMMEDIATE`` so it holds the write lock from its first read (a deferred transaction that
reads, then writes, fails with "database is locked" when another writer committed in between;
research note §B.4). PostgreSQL claims use ``SELECT ... FOR UPDATE SKIP LOCKED`` (assign.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from alignkit.annotate.schema import Base
from alignkit.errors import AlignkitError

__all__ = ["SCHEMA_VERSION", "Database", "DatabaseError", "open_database", "utcnow"]

_WRITE = "alignkit_write"
_VERSION_TABLE = "alignkit_schema"


class DatabaseError(AlignkitError):
    """The database URL is wrong, unreachable, or holds a schema alignkit cannot use."""


def utcnow() -> datetime:
    """Naive UTC now (both backends store naive timestamps the same way)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _migrate_v2(conn: Connection) -> None:
    # v2: the optional safety question ("which is safer / is each safe").
    false = "FALSE" if conn.dialect.name == "postgresql" else "0"
    conn.exec_driver_sql(
        f"ALTER TABLE tasks ADD COLUMN ask_safety BOOLEAN NOT NULL DEFAULT {false}"
    )
    conn.exec_driver_sql("ALTER TABLE annotations ADD COLUMN safer VARCHAR(4)")
    conn.exec_driver_sql("ALTER TABLE annotations ADD COLUMN a_safe BOOLEAN")
    conn.exec_driver_sql("ALTER TABLE annotations ADD COLUMN b_safe BOOLEAN")


# MIGRATIONS[v] upgrades a database at version v - 1 to version v. Version 1 is the first schema.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {2: _migrate_v2}
SCHEMA_VERSION = max(MIGRATIONS)


class Database:
    """An engine plus session factories: ``read()`` for queries, ``write()`` for changes."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        # SQLite has one writer at a time anyway; queueing this process's writers on a lock avoids
        # SQLite's busy-wait back-off (sleeps of up to 100 ms), which made the p99 latency ~1 s.
        # BEGIN IMMEDIATE still guards against writers in other processes.
        self._local_writer = threading.Lock() if self.dialect == "sqlite" else nullcontext()
        self._read = sessionmaker(engine, expire_on_commit=False)
        self._write = sessionmaker(
            engine.execution_options(**{_WRITE: True}), expire_on_commit=False
        )

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction, committed on exit (before any reply is sent), rolled back on error."""
        with self._local_writer, self._write() as session, session.begin():
            yield session

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return _read_version(conn)

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_events(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a process crash loses nothing
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(
            "BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN"
        )


def _read_version(conn: Connection) -> int:
    if not inspect(conn).has_table(_VERSION_TABLE):
        return 0
    return int(conn.execute(text(f"SELECT version FROM {_VERSION_TABLE}")).scalar_one())


def _migrate(db: Database, url: str) -> None:
    with db.engine.connect().execution_options(**{_WRITE: True}) as conn, conn.begin():
        if db.dialect == "postgresql":  # two servers starting at once migrate one after the other
            conn.execute(text("SELECT pg_advisory_xact_lock(7316001)"))
        version = _read_version(conn)
        if version == 0:
            if inspect(conn).has_table("prompts"):
                raise DatabaseError(
                    f"{url}: has a 'prompts' table but no {_VERSION_TABLE} table; not an alignkit labelling database"
                )
            Base.metadata.create_all(conn)
            conn.execute(text(f"CREATE TABLE {_VERSION_TABLE} (version INTEGER NOT NULL)"))
            conn.execute(text(f"INSERT INTO {_VERSION_TABLE} (version) VALUES ({SCHEMA_VERSION})"))
            return
        if version > SCHEMA_VERSION:
            raise DatabaseError(
                f"{url}: schema version {version} was written by a newer alignkit "
                f"(this one knows up to {SCHEMA_VERSION}); upgrade alignkit"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[target](conn)
            conn.execute(text(f"UPDATE {_VERSION_TABLE} SET version = {target}"))


def default_url(path: str | Path = "annotate.db") -> str:
    return f"sqlite:///{Path(path)}"


def open_database(url: str, *, pool_size: int = 20) -> Database:
    """Open (creating or upgrading the schema) the database at SQLAlchemy ``url``.

    A plain path is read as a SQLite file. ``postgresql://`` URLs use psycopg 3.
    """
    if "://" not in url:
        url = default_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise DatabaseError(f"--db {url!r}: not a database URL ({err})") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise DatabaseError("--db: an in-memory SQLite database cannot be shared; give a file")
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            max_overflow=10,
        )
        _sqlite_events(engine)
    elif parsed.get_backend_name() == "postgresql":
        engine = create_engine(parsed, pool_size=pool_size, max_overflow=10, pool_pre_ping=True)
    else:
        raise DatabaseError(f"--db {url!r}: only sqlite:/// and postgresql:// are supported")
    db = Database(engine)
    try:
        _migrate(db, url)
    except OperationalError as err:
        engine.dispose()
        raise DatabaseError(
            f"--db {parsed.render_as_string(hide_password=True)}: cannot open ({err.orig})"
        ) from None
    return db
