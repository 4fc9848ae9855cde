"""Fixtures of the labelling-server tests: a database on SQLite and, where one can be had, on a
real PostgreSQL server (``ALIGNKIT_TEST_PG_URL``, or a throwaway cluster started here with the
Debian binaries; research note §B.2). Without PostgreSQL its tests are skipped, loudly."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from launch_helpers import free_port

from alignkit.annotate.db import Database, open_database

_PG_SKIP = "POSTGRESQL TESTS SKIPPED: {}. Set ALIGNKIT_TEST_PG_URL or install the Debian 'postgresql' package."


def _throwaway_cluster(tmp: Path) -> tuple[str, str]:
    """Start a PostgreSQL cluster in ``tmp``; returns ``(url, postmaster pid)``."""
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not binaries:
        raise RuntimeError("no /usr/lib/postgresql/*/bin/initdb")
    bindir = Path(binaries[-1]).parent
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        if shutil.which("runuser") is None:
            raise RuntimeError("running as root without runuser")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(tmp, "postgres", "postgres")
    port = free_port()
    data = tmp / "data"
    subprocess.run(
        [
            *as_user,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",  # a throwaway cluster: initdb's fsync of every file took seconds
        ],
        check=True,
        capture_output=True,
    )
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {tmp} -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    subprocess.run(
        [
            *as_user,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(tmp / "log"),
            "-w",
            "-t",
            "30",
            "-o",
            options,
            "start",
        ],
        check=True,
        capture_output=True,
    )
    pid = (data / "postmaster.pid").read_text().split()[0]
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", pid


def _memory_dir() -> str | None:
    """/dev/shm where it has room: the cluster is thrown away, and on a busy disk its files took
    longer to create and delete than the tests took to use them. None: the usual temp folder."""
    try:
        room = shutil.disk_usage("/dev/shm").free
    except OSError:
        return None
    return "/dev/shm" if room >= 1 << 30 else None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The admin URL of a PostgreSQL server, or a loud skip."""
    url = os.environ.get("ALIGNKIT_TEST_PG_URL")
    if url:
        yield url
        return
    tmp = Path(tempfile.mkdtemp(prefix="alignkit-pg-", dir=_memory_dir()))
    try:
        url, pid = _throwaway_cluster(tmp)
    except (RuntimeError, OSError, LookupError, subprocess.CalledProcessError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        message = _PG_SKIP.format(err)
        warnings.warn(message, stacklevel=1)
        pytest.skip(message)
    try:
        yield url
    finally:
        # immediate shutdown, by its pid: a throwaway cluster needs no shutdown checkpoint
        # (a fast shutdown spent ~20 s flushing the test databases' pages)
        os.kill(int(pid), signal.SIGQUIT)
        for _ in range(200):
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        shutil.rmtree(tmp, ignore_errors=True)


def _admin(server_url: str, statement: str) -> None:
    import psycopg

    with psycopg.connect(server_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(statement)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL on each backend. A PostgreSQL one is dropped after its test
    (with the connections a test left open): ~8 MB each, they made the cluster slow to delete."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'labels.db'}"
        return
    server = request.getfixturevalue("pg_server")
    name = "ak_" + uuid.uuid4().hex[:12]
    _admin(server, f"CREATE DATABASE {name}")
    yield server.rsplit("/", 1)[0] + "/" + name
    _admin(server, f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = open_database(db_url)
    yield database
    database.dispose()
