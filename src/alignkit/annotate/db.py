"""The labelling database: engine set-up for SQLite (default) and PostgreSQL, and versioned
migrations run by the server itself, so a database written by an older alignkit opens.

SQLite runs in WAL mode with a busy timeout; every *write* transaction starts with
``BEGIN IMMEDIATE`` so it holds the write lock from its first read (a deferred transaction that
reads, then writes, fails with "database is locked" when another writer committed in between;
research note §B.4). PostgreSQL claims use ``SELECT ... FOR UPDATE SKIP LOCKED`` (assign.py).

A SQLite file is checked when it is opened (``PRAGMA quick_check``): one that is not a database
or is damaged is refused with a one-line error instead of taking labels. ``classify`` says what
a database error means (disk full, damaged, busy, lost) for the reply and the log.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.exc import DatabaseError as SQLDatabaseError
from sqlalchemy.orm import Session, sessionmaker

from alignkit.annotate.schema import Base
from alignkit.errors import AlignkitError

__all__ = [
    "SCHEMA_VERSION",
    "Database",
    "DatabaseError",
    "Fault",
    "classify",
    "open_database",
    "utcnow",
]

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


def _migrate_v3(conn: Connection) -> None:
    # v3: gold tasks are served like any other task (to `target` annotators, in the pool's
    # order) instead of to everyone at a rate; a prompt can lend a response to gold pairs.
    false, true = ("FALSE", "TRUE") if conn.dialect.name == "postgresql" else ("0", "1")
    conn.exec_driver_sql(
        f"ALTER TABLE prompts ADD COLUMN gold_donor BOOLEAN NOT NULL DEFAULT {false}"
    )
    conn.exec_driver_sql(
        "UPDATE tasks SET target = (SELECT COALESCE(MAX(t.target), 3) FROM tasks t "
        f"WHERE t.is_gold = {false}) WHERE is_gold = {true} AND target = 0"
    )


# MIGRATIONS[v] upgrades a database at version v - 1 to version v. Version 1 is the first schema.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {2: _migrate_v2, 3: _migrate_v3}
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


@dataclass(frozen=True)
class Fault:
    """What a database error means for the person who sees it: an HTTP status, a message, and
    whether the operator must hear of it (logged) and whether a retry can succeed."""

    status: int
    message: str
    log: bool
    retry: bool


_SQLITE = {  # sqlite3 error names (Python >= 3.11) by prefix
    "SQLITE_FULL": "disk full",
    "SQLITE_IOERR": "disk I/O error",
    "SQLITE_CORRUPT": "damaged",
    "SQLITE_NOTADB": "damaged",
    "SQLITE_BUSY": "busy",
    "SQLITE_LOCKED": "busy",
}
_POSTGRES = {  # SQLSTATE by prefix
    "53100": "disk full",
    "58030": "disk I/O error",
    "XX001": "damaged",
    "XX002": "damaged",
    "40P01": "busy",
    "40001": "busy",
    "55P03": "busy",
}


def classify(err: BaseException) -> Fault:
    """The meaning of a SQLAlchemy error raised by a query: nothing was committed in any case."""
    orig = getattr(err, "orig", None)
    code = getattr(orig, "sqlite_errorname", None) or getattr(orig, "sqlstate", None) or ""
    table = _SQLITE if code.startswith("SQLITE") else _POSTGRES
    kind = next((v for k, v in table.items() if code.startswith(k)), None)
    detail = f"{type(orig or err).__name__}: {str(orig or err).strip().splitlines()[0]}"
    if kind == "disk full":
        return Fault(
            507, f"disk full: the database cannot grow ({detail}); nothing was stored", True, True
        )
    if kind == "disk I/O error":
        return Fault(
            503,
            f"disk I/O error ({detail}): is the disk full or failing? nothing was stored",
            True,
            True,
        )
    if kind == "damaged":
        return Fault(
            503,
            f"the database is damaged ({detail}): stop the server, check the file "
            "(PRAGMA integrity_check) and restore it from a backup",
            True,
            False,
        )
    if kind == "busy":
        return Fault(503, f"database busy, retry ({type(orig or err).__name__})", False, True)
    if isinstance(err, OperationalError):  # a lost connection, a server shutting down
        return Fault(503, f"database unavailable, retry ({detail})", True, True)
    if isinstance(err, DBAPIError) and type(err).__name__ == "DataError":
        return Fault(422, f"a value cannot be stored ({detail})", False, False)
    return Fault(503, f"database error ({detail})", True, False)


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


def open_database(url: str, *, pool_size: int = 20, check: bool = True) -> Database:
    """Open (creating or upgrading the schema) the database at SQLAlchemy ``url``.

    A plain path is read as a SQLite file. ``postgresql://`` URLs use psycopg 3. A SQLite file
    that is not a database or fails ``PRAGMA quick_check`` is refused (``check``).
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
    shown = parsed.render_as_string(hide_password=True)
    try:
        if db.dialect == "sqlite" and check:
            _check_integrity(db, shown)
        _migrate(db, url)
    except OperationalError as err:
        engine.dispose()
        raise DatabaseError(f"--db {shown}: cannot open ({err.orig})") from None
    except SQLDatabaseError as err:  # "file is not a database", "disk image is malformed"
        engine.dispose()
        raise DatabaseError(
            f"--db {shown}: not a SQLite database, or a damaged one ({err.orig}); "
            "restore it from a backup"
        ) from None
    except DatabaseError:
        engine.dispose()
        raise
    return db


def _check_integrity(db: Database, shown: str) -> None:
    """``PRAGMA quick_check`` (every page and record, without the index cross-check): a damaged
    file is refused at start instead of acknowledging labels into it."""
    with db.engine.connect() as conn:
        problems = [row[0] for row in conn.exec_driver_sql("PRAGMA quick_check(20)")]
    if problems != ["ok"]:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DatabaseError(
            f"--db {shown}: the database is damaged (PRAGMA quick_check: {problems[0]}{more}); "
            "restore it from a backup"
        )
