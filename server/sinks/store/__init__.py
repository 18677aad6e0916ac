"""Session timelines in a database (SQLite or PostgreSQL): the writer, reads, the schema."""

from server.sinks.store.urls import database_url, redacted
from server.sinks.store.writer import HAND_ON_AFTER_S, Store, StoreUnavailable

__all__ = ["HAND_ON_AFTER_S", "Store", "StoreUnavailable", "database_url", "redacted"]
