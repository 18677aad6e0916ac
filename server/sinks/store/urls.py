"""Database URLs: ``--db`` to a SQLAlchemy URL, and a URL fit to show (no secrets)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa


def database_url(db: str) -> str:
    """``--db``: a file path means SQLite; a ``postgresql://`` URL means PostgreSQL."""
    if db.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + db.split("://", 1)[1]
    if db.startswith(("postgresql+", "sqlite:")):
        return db
    if db == ":memory:":
        return "sqlite://"
    Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return "sqlite:///" + str(Path(db).expanduser())


CREDENTIAL_PARAMS = ("password", "passwd", "sslpassword", "sslkey", "passfile")


def redacted(url: str) -> str:
    """A database URL without its secrets: SQLAlchemy's rendering with the password hidden, and
    every credential query parameter (``?password=``, libpq's ``sslpassword`` ...) masked too."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        return "(a database URL that does not parse)"
    hidden = {k: "***" for k in parsed.query if k.lower() in CREDENTIAL_PARAMS}
    if hidden:
        parsed = parsed.update_query_dict(hidden)
    return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")
