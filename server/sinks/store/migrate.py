"""The schema: numbered SQL files in ``migrations/``, applied in order at start, once each."""

from __future__ import annotations

import re
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_MIGRATION_FILE = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")
_ADVISORY_LOCK = 7_300_511  # PostgreSQL: one node migrates at a time


def migrations() -> list[tuple[int, str, list[str]]]:
    out = []
    for path in sorted(MIGRATIONS.glob("*.sql")):
        match = _MIGRATION_FILE.fullmatch(path.name)
        if not match:
            raise RuntimeError(f"migration file {path.name} is not named NNNN_name.sql")
        body = "\n".join(
            line for line in path.read_text().splitlines() if not line.strip().startswith("--")
        )
        statements = [s.strip() for s in body.split(";") if s.strip()]
        out.append((int(match.group(1)), path.stem, statements))
    return out


def migrate(conn: Connection) -> list[int]:
    """Apply the migrations this database lacks, in order; the versions applied."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK})
    conn.execute(
        sa.text(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, name VARCHAR(255) NOT NULL, "
            "applied_at DOUBLE PRECISION NOT NULL)"
        )
    )
    done = {row[0] for row in conn.execute(sa.text("SELECT version FROM schema_migrations"))}
    applied = []
    for version, name, statements in migrations():
        if version in done:
            continue
        for statement in statements:
            if conn.dialect.name == "sqlite" and _column_exists(conn, statement):
                continue  # a SQLite file from before migrations already has it
            conn.execute(sa.text(statement))
        conn.execute(
            sa.text(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (:v, :n, :t)"
            ),
            {"v": version, "n": name, "t": time.time()},
        )
        applied.append(version)
    return applied


def _column_exists(conn: Connection, statement: str) -> bool:
    match = re.match(r"ALTER TABLE (\w+) ADD COLUMN (\w+)", statement, re.IGNORECASE)
    if not match:
        return False
    columns = {row[1] for row in conn.execute(sa.text(f"PRAGMA table_info({match.group(1)})"))}
    return match.group(2) in columns
