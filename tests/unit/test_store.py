"""The ingest server's SQLite store: migrations, idempotent batches, queries, agent rows."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lw_embed.server import store as store_mod
from lw_embed.server.store import MAX_LIMIT, MIGRATIONS, SCHEMA_VERSION, Store, StoreError

T0 = 1_700_000_000_000_000_000
EXEC_A = "9f86d081884c7d65"
EXEC_B = "0123456789abcdef"


class Clock:
    def __init__(self, start: int = 5_000) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now


def event(seq: int, kind: str = "process.exec", exec_id: str | None = EXEC_A,
          time: int | None = None, **extra: Any) -> dict[str, Any]:  # fmt: skip
    ev: dict[str, Any] = {"kind": kind, "seq": seq, "time": T0 + seq if time is None else time}
    if exec_id is not None:
        ev["exec_id"] = exec_id
    ev.update(extra)
    return ev


def batch(events: list[dict[str, Any]], *, iid: str = "agent-1", seq: tuple[int, int] | None = None,
          loss: dict[str, int] | None = None, version: str = "0.1.0",
          resource: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    seqs = [e["seq"] for e in events] or [0]
    return {
        "agent": {"instance_id": iid, "mode": "wrapper", "version": version},
        "events": events,
        "loss": loss or {},
        "processes": [],
        "resource": resource or {"container_id": "c1"},
        "schema": 1,
        "seq": list(seq or (min(seqs), max(seqs))),
    }


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(tmp_path: Path, clock: Clock) -> Iterator[Store]:
    with Store(str(tmp_path / "ingest.db"), clock=clock) as s:
        yield s


# -- migrations ---------------------------------------------------------------------------


def test_new_store_is_migrated_to_the_latest_version(tmp_path: Path) -> None:
    path = str(tmp_path / "new.db")
    with Store(path) as s:
        assert s.user_version() == SCHEMA_VERSION == len(MIGRATIONS) >= 1
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        indexes = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    finally:
        con.close()
    assert {"agents", "events"} <= tables
    assert {"events_time", "events_kind_time", "events_exec_time", "events_agent_time"} <= indexes


def test_reopening_keeps_the_data_and_the_version(tmp_path: Path) -> None:
    path = str(tmp_path / "re.db")
    with Store(path) as s:
        s.store_batch(batch([event(0)]))
    with Store(path) as s:
        assert s.user_version() == SCHEMA_VERSION
        assert s.count() == 1


def test_a_later_migration_is_applied_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "mig.db")
    with Store(path) as s:
        s.store_batch(batch([event(0)]))
    extra = "CREATE TABLE notes (id INTEGER PRIMARY KEY, t TEXT); INSERT INTO notes VALUES (1, 'x')"
    monkeypatch.setattr(store_mod, "MIGRATIONS", (*MIGRATIONS, extra))
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", len(MIGRATIONS) + 1)
    with Store(path) as s:
        assert s.user_version() == len(MIGRATIONS) + 1
        assert s.count() == 1
    con = sqlite3.connect(path)
    try:
        assert con.execute("SELECT t FROM notes").fetchall() == [("x",)]
    finally:
        con.close()


def test_a_failing_migration_is_rolled_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "bad.db")
    Store(path).close()
    broken = "CREATE TABLE half (x INTEGER); THIS IS NOT SQL"
    monkeypatch.setattr(store_mod, "MIGRATIONS", (*MIGRATIONS, broken))
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", len(MIGRATIONS) + 1)
    with pytest.raises(StoreError):
        Store(path)
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert not con.execute("SELECT name FROM sqlite_master WHERE name='half'").fetchall()
    finally:
        con.close()


def test_a_store_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "newer.db")
    Store(path).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(StoreError, match="newer"):
        Store(path)
    with pytest.raises(StoreError, match="newer"):
        Store(path, readonly=True)


def test_unopenable_path_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        Store(str(tmp_path / "no" / "such" / "dir.db"))


# -- storing ------------------------------------------------------------------------------


def test_store_batch_is_idempotent_per_instance_and_seq(db: Store) -> None:
    b = batch([event(0), event(1), event(2)])
    assert db.store_batch(b) == (3, 0)
    assert db.store_batch(b) == (0, 3)
    # re-cut after a restart: overlaps 1..2, adds 3..4
    assert db.store_batch(batch([event(1), event(2), event(3), event(4)])) == (2, 2)
    # the same seq from another agent instance is another event
    assert db.store_batch(batch([event(0)], iid="agent-2")) == (1, 0)
    assert db.count() == 6
    assert [(e["instance_id"], e["seq"]) for e in db.events()] == [
        ("agent-1", 0), ("agent-2", 0), ("agent-1", 1), ("agent-1", 2), ("agent-1", 3),
        ("agent-1", 4),
    ]  # fmt: skip


def test_a_duplicate_keeps_the_first_body(db: Store) -> None:
    db.store_batch(batch([event(0, pid=1)]))
    assert db.store_batch(batch([event(0, pid=2)])) == (0, 1)
    assert db.events()[0]["pid"] == 1


def test_an_empty_batch_updates_the_agent_only(db: Store) -> None:
    assert db.store_batch(batch([], seq=(7, 7), loss={"queue_full": 2})) == (0, 0)
    (agent,) = db.agents()
    assert agent["loss"] == {"queue_full": 2} and agent["events_stored"] == 0


def test_events_are_stored_as_sent_with_bytes_as_hex(db: Store) -> None:
    ev = event(0, argv=["curl", "-s"], blob=b"\x00\xff", nested={"b": [1, 2.5, None, True]})
    db.store_batch(batch([ev]))
    (got,) = db.events()
    assert got == {**ev, "blob": "00ff", "instance_id": "agent-1"}


def test_a_failed_batch_stores_nothing(db: Store) -> None:
    good, bad = event(0), event(1, time=1 << 64)  # does not fit SQLite's INTEGER
    with pytest.raises(OverflowError):
        db.store_batch(batch([good, bad]))
    assert db.count() == 0 and db.agents() == []
    assert db.store_batch(batch([good])) == (1, 0)


# -- queries ------------------------------------------------------------------------------


@pytest.fixture
def filled(db: Store) -> Store:
    db.store_batch(batch([
        event(0, "process.exec", EXEC_A, time=T0 + 30),
        event(1, "net.connect", EXEC_A, time=T0 + 10),
        event(2, "process.exit", EXEC_A, time=T0 + 50),
        event(3, "agent.status", None, time=T0 + 20),
    ]))  # fmt: skip
    db.store_batch(batch([
        event(0, "process.exec", EXEC_B, time=T0 + 40),
        event(1, "process.exit", EXEC_B, time=T0 + 60),
    ], iid="agent-2"))  # fmt: skip
    return db


def _keys(events: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(e["instance_id"], e["seq"]) for e in events]


def test_events_come_oldest_first(filled: Store) -> None:
    times = [e["time"] for e in filled.events()]
    assert times == sorted(times) and len(times) == 6


def test_query_filters(filled: Store) -> None:
    assert _keys(filled.events(kind="process.exec")) == [("agent-1", 0), ("agent-2", 0)]
    assert _keys(filled.events(exec_id=EXEC_B)) == [("agent-2", 0), ("agent-2", 1)]
    assert _keys(filled.events(agent="agent-2")) == [("agent-2", 0), ("agent-2", 1)]
    assert _keys(filled.events(since_ns=T0 + 40)) == [("agent-2", 0), ("agent-1", 2),
                                                      ("agent-2", 1)]  # fmt: skip
    assert _keys(filled.events(kind="process.exit", since_ns=T0 + 55)) == [("agent-2", 1)]
    assert _keys(filled.events(kind="process.exit", agent="agent-1", exec_id=EXEC_A)) == [
        ("agent-1", 2)
    ]
    assert filled.events(kind="no.such.kind") == []
    assert filled.events(agent="nobody") == []
    assert "exec_id" not in filled.events(kind="agent.status")[0]


def test_query_limit(filled: Store) -> None:
    assert _keys(filled.events(limit=2)) == [("agent-1", 1), ("agent-1", 3)]
    assert len(filled.events(limit=MAX_LIMIT)) == 6
    for bad in (0, -1, MAX_LIMIT + 1):
        with pytest.raises(ValueError):
            filled.events(limit=bad)


# -- agents -------------------------------------------------------------------------------


def test_agents_table_tracks_identity_times_loss_and_counts(db: Store, clock: Clock) -> None:
    clock.now = 1_000
    db.store_batch(batch([event(0), event(1)], loss={"queue_full": 1}, version="0.1.0"))
    clock.now = 2_000
    db.store_batch(batch([event(1), event(2)], loss={"queue_full": 4, "spool_full": 1},
                         version="0.2.0", resource={"container_id": "c2"}))  # fmt: skip
    (agent,) = db.agents()
    assert agent == {
        "instance_id": "agent-1", "version": "0.2.0", "mode": "wrapper",
        "resource": {"container_id": "c2"}, "first_seen": 1_000, "last_seen": 2_000,
        "loss": {"queue_full": 4, "spool_full": 1}, "seq_last": 2, "events_stored": 3,
    }  # fmt: skip


def test_a_late_resend_of_an_old_batch_does_not_roll_loss_back(db: Store, clock: Clock) -> None:
    old = batch([event(0)], loss={"queue_full": 1})
    db.store_batch(old)
    clock.now += 10
    db.store_batch(batch([event(5)], loss={"queue_full": 9}))
    clock.now += 10
    assert db.store_batch(old) == (0, 1)
    (agent,) = db.agents()
    assert agent["loss"] == {"queue_full": 9}
    assert agent["seq_last"] == 5
    assert agent["last_seen"] == clock.now  # it was seen, though
    assert agent["events_stored"] == 2


def test_agents_are_listed_by_instance_id(db: Store) -> None:
    for iid in ("zed", "alpha", "mid"):
        db.store_batch(batch([event(0)], iid=iid))
    assert [a["instance_id"] for a in db.agents()] == ["alpha", "mid", "zed"]


# -- the read-only connection --------------------------------------------------------------


def test_reader_sees_commits_and_cannot_write(db: Store) -> None:
    with Store(db.path, readonly=True) as reader:
        assert reader.events() == []
        db.store_batch(batch([event(0)]))
        assert len(reader.events()) == 1
        assert reader.agents()[0]["instance_id"] == "agent-1"
        with pytest.raises(sqlite3.OperationalError):
            reader.store_batch(batch([event(1)]))
    assert db.count() == 1


def test_reader_needs_an_initialised_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        Store(str(tmp_path / "missing.db"), readonly=True)
    assert not (tmp_path / "missing.db").exists()
    sqlite3.connect(tmp_path / "empty.db").close()
    with pytest.raises(StoreError, match="not initialised"):
        Store(str(tmp_path / "empty.db"), readonly=True)
