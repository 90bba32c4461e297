"""A throwaway PostgreSQL 15 cluster for tests: initdb + pg_ctl on a free localhost port.

The server refuses to run as root and CI runs as root, so as root the cluster belongs to the
unprivileged ``postgres`` user (``runuser -u postgres --``) in a temporary folder chowned to it.
Skipped, with the reason, only where the server binaries or psycopg are absent.
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", PG_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def postgres_url_or_skip() -> Iterator[str]:
    """Start a cluster, create database ``planner``, yield its URL; stop and remove it afterwards."""
    if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists():
        pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN}")
    pytest.importorskip("psycopg", reason="psycopg not installed (pip install '.[distributed]')")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(PG_USER)
        except KeyError:
            pytest.skip(f"running as root and there is no {PG_USER!r} user to own the cluster")
    root = Path(tempfile.mkdtemp(prefix="planner-pg-"))
    data, port = root / "data", _free_port()
    if os.geteuid() == 0:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    run = lambda *cmd: subprocess.run(_as_owner([*cmd]), check=True, capture_output=True, text=True)  # noqa: E731
    try:
        run(str(PG_BIN / "initdb"), "-D", str(data), "-U", "planner", "--auth=trust", "-E", "UTF8", "--no-sync")
        run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200", "start")
        run(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "planner", "planner")
        yield f"postgresql+psycopg://planner@127.0.0.1:{port}/planner"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(_as_owner([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                           capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    yield from postgres_url_or_skip()
