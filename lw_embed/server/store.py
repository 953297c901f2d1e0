"""The ingest server's SQLite store: agents and their events, stored once per (instance, seq).

Interface: one SQLite database file (stdlib :mod:`sqlite3`) in WAL mode, ``synchronous=FULL``
so that a committed batch -- and the 200 the agent deletes its spool on -- survives a power
cut. The schema is versioned with ``PRAGMA user_version``: :data:`MIGRATIONS` is a list of
scripts applied in order, each in its own transaction together with the version bump, so a
later version only appends a script. Tables:

- ``agents``: one row per agent ``instance_id``: ``version``, ``mode``, ``resource`` (JSON),
  ``loss`` (JSON, the cumulative loss map of the agent's latest batch), ``seq_last`` (the
  highest sequence number seen; "latest" is the batch with the highest ``seq_last``, so a
  late resend of an old batch does not roll the loss totals back), ``first_seen`` and
  ``last_seen`` (receive times, ns since the epoch, from the injected clock) and
  ``events_stored``;
- ``events``: ``(instance_id, seq)`` primary key, ``kind``, ``time``, ``exec_id`` (NULL when
  the event has none) and ``body``, the event as compact sorted JSON with byte strings as
  hex (the same text as ``lw-embed decode`` prints).

A :class:`Store` is one connection and must be used from the thread that opened it: the
ingest server opens a writer in one thread and a read-only (``query_only``) reader in
another; WAL lets the reader see committed data without blocking the writer.

Capability: read/write access to the database file and its directory (``-wal``/``-shm``).

Cost: :meth:`Store.store_batch` is one ``BEGIN IMMEDIATE`` .. ``COMMIT`` (one WAL fsync) with
one ``executemany`` of ``INSERT OR IGNORE`` and one upsert of the agent row; JSON-encoding
the events dominates (a few microseconds each). Queries use the indexes on ``time``,
``(kind, time)``, ``(exec_id, time)`` and ``(instance_id, time)``, and hold at most ``limit``
rows in memory.

Failure modes: a database written by a newer lw-embed (``user_version`` beyond
:data:`MIGRATIONS`) or one that cannot be opened or migrated raises :class:`StoreError`;
:meth:`Store.store_batch` rolls back and re-raises on any failure (``sqlite3.Error``, e.g. a
full disk), so a batch is stored whole or not at all. ``store_batch`` trusts its input to be
a batch checked by :func:`lw_embed.codec.decode_batch` with an int ``seq`` on every event
and 64-bit ``seq``/``time`` values (:func:`lw_embed.server.parse.check_seqs`); anything
else is a bug in the caller and raises ``KeyError``/``TypeError``/``OverflowError``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from lw_embed.decode import to_json_line
from lw_embed.errors import LwEmbedError

#: Schema migrations; ``PRAGMA user_version`` is the number of them applied. Append only.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE agents (
        instance_id   TEXT PRIMARY KEY,
        version       TEXT NOT NULL,
        mode          TEXT NOT NULL,
        resource      TEXT NOT NULL,
        first_seen    INTEGER NOT NULL,
        last_seen     INTEGER NOT NULL,
        loss          TEXT NOT NULL,
        seq_last      INTEGER NOT NULL,
        events_stored INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE events (
        instance_id TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        kind        TEXT NOT NULL,
        time        INTEGER NOT NULL,
        exec_id     TEXT,
        body        TEXT NOT NULL,
        PRIMARY KEY (instance_id, seq)
    );
    CREATE INDEX events_time ON events (time);
    CREATE INDEX events_kind_time ON events (kind, time);
    CREATE INDEX events_exec_time ON events (exec_id, time) WHERE exec_id IS NOT NULL;
    CREATE INDEX events_agent_time ON events (instance_id, time);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
#: The most rows one :meth:`Store.events` call returns.
MAX_LIMIT = 100_000

_UPSERT_AGENT = """
INSERT INTO agents (instance_id, version, mode, resource, first_seen, last_seen, loss,
                    seq_last, events_stored)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (instance_id) DO UPDATE SET
    version  = CASE WHEN excluded.seq_last >= seq_last THEN excluded.version ELSE version END,
    mode     = CASE WHEN excluded.seq_last >= seq_last THEN excluded.mode ELSE mode END,
    resource = CASE WHEN excluded.seq_last >= seq_last THEN excluded.resource ELSE resource END,
    loss     = CASE WHEN excluded.seq_last >= seq_last THEN excluded.loss ELSE loss END,
    seq_last = max(seq_last, excluded.seq_last),
    last_seen = max(last_seen, excluded.last_seen),
    events_stored = events_stored + excluded.events_stored
"""
_AGENT_COLUMNS = (
    "instance_id", "version", "mode", "resource", "first_seen", "last_seen", "loss",
    "seq_last", "events_stored",
)  # fmt: skip


class StoreError(LwEmbedError):
    """The database cannot be opened, migrated, or is newer than this code."""


class Store:
    """One connection to the store; use it from the thread that created it only."""

    def __init__(
        self, path: str, *, readonly: bool = False, clock: Callable[[], int] = time.time_ns
    ) -> None:
        self.path = path
        self._clock = clock
        # the reader must not create an empty database where the writer has not made one
        target, uri = (
            (Path(path).absolute().as_uri() + "?mode=rw", True) if readonly else (path, False)
        )
        try:
            self._db = sqlite3.connect(target, isolation_level=None, timeout=30.0, uri=uri)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store {path}: {exc}") from exc
        try:
            self._db.execute("PRAGMA busy_timeout = 30000")
            if readonly:
                self._db.execute("PRAGMA query_only = ON")
                if self._check_version() != SCHEMA_VERSION:
                    raise StoreError(f"the store {path} is not initialised (open it writable)")
            else:
                mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"the store {path} cannot use WAL (journal_mode {mode})")
                self._db.execute("PRAGMA synchronous = FULL")
                self._migrate()
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"cannot open the store {path}: {exc}") from exc
        except StoreError:
            self._db.close()
            raise

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def user_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _check_version(self) -> int:
        version = self.user_version()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the store {self.path} has schema version {version}, newer than this "
                f"lw-embed's {SCHEMA_VERSION}"
            )
        return version

    def _migrate(self) -> None:
        for version in range(self._check_version(), SCHEMA_VERSION):
            try:
                self._db.execute("BEGIN IMMEDIATE")
                # user_version may have moved while we waited for the lock (another process)
                if self.user_version() != version:
                    self._db.execute("ROLLBACK")
                    self._migrate()
                    return
                for statement in _statements(MIGRATIONS[version]):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {version + 1}")
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # -- writing --------------------------------------------------------------------------

    def store_batch(self, batch: Mapping[str, Any]) -> tuple[int, int]:
        """Store a decoded, checked batch in one transaction; return (stored, duplicates).

        An event whose ``(instance_id, seq)`` is already stored is left as it was and
        counted as a duplicate.
        """
        agent = batch["agent"]
        iid: str = agent["instance_id"]
        rows = [
            (
                iid,
                ev["seq"],
                ev["kind"],
                ev["time"],
                ev["exec_id"] if isinstance(ev.get("exec_id"), str) else None,
                to_json_line(ev),
            )
            for ev in batch["events"]
        ]
        now = self._clock()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            cur = db.executemany(
                "INSERT OR IGNORE INTO events (instance_id, seq, kind, time, exec_id, body)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            stored = max(cur.rowcount, 0) if rows else 0
            db.execute(
                _UPSERT_AGENT,
                (
                    iid,
                    agent["version"],
                    agent["mode"],
                    to_json_line(batch["resource"]),
                    now,
                    now,
                    to_json_line(batch["loss"]),
                    batch["seq"][1],
                    stored,
                ),
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return stored, len(rows) - stored

    # -- reading --------------------------------------------------------------------------

    def events(
        self,
        kind: str | None = None,
        since_ns: int | None = None,
        exec_id: str | None = None,
        agent: str | None = None,
        limit: int = 10000,
    ) -> list[dict[str, Any]]:
        """Stored events matching every filter given, oldest first, at most ``limit``.

        Each is the event as stored plus ``instance_id``, the agent that sent it.
        ``since_ns`` keeps events with ``time >= since_ns``.
        """
        if not 0 < limit <= MAX_LIMIT:
            raise ValueError(f"limit {limit} not in 1..{MAX_LIMIT}")
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("kind", kind), ("exec_id", exec_id), ("instance_id", agent)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since_ns is not None:
            where.append("time >= ?")
            args.append(since_ns)
        sql = "SELECT instance_id, body FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY time, instance_id, seq LIMIT ?"
        args.append(limit)
        out: list[dict[str, Any]] = []
        for iid, body in self._db.execute(sql, args):
            event = json.loads(body)
            event["instance_id"] = iid
            out.append(event)
        return out

    def agents(self) -> list[dict[str, Any]]:
        """Every agent instance seen, by instance id: identity, times, loss, counts."""
        cols = ", ".join(_AGENT_COLUMNS)
        out: list[dict[str, Any]] = []
        for row in self._db.execute(f"SELECT {cols} FROM agents ORDER BY instance_id"):
            rec = dict(zip(_AGENT_COLUMNS, row, strict=True))
            rec["resource"] = json.loads(rec["resource"])
            rec["loss"] = json.loads(rec["loss"])
            out.append(rec)
        return out

    def count(self) -> int:
        """How many events are stored."""
        return int(self._db.execute("SELECT count(*) FROM events").fetchone()[0])


def _statements(script: str) -> list[str]:
    """The statements of a migration script (ours: no ``;`` inside literals or triggers)."""
    return [s.strip() for s in script.split(";") if s.strip()]
