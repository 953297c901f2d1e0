"""The durable spool: round trip, priorities, durability, recovery, eviction (real files)."""

from __future__ import annotations

import errno
import json
import os
import random
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import cbor2
import pytest

import lw_embed.spool._spool as spool_impl
from lw_embed.errors import LwEmbedError
from lw_embed.spool import (
    Spool,
    SpoolError,
    SpoolItem,
    SpoolLocked,
    SpoolStats,
    priority_of,
)

BIG = 1 << 30


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(path: Path, **kw: Any) -> Spool:
    args: dict[str, Any] = {
        "max_bytes": 1 << 20,
        "segment_bytes": 4096,
        "sync_interval": 0.1,
        "clock": Clock(),
    }
    args.update(kw)
    s = Spool(str(path), **args)
    s.open()
    return s


def reopen(s: Spool, path: Path, *, crash: bool = False, **kw: Any) -> Spool:
    if crash:
        s._simulate_crash()
    else:
        s.close()
    return make(path, **kw)


def ev(kind: str, i: int = 0, pad: int = 40, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "time": 1_700_000_000_000_000_000 + i, "i": i, "pad": "x" * pad, **extra}


def put(s: Spool, event: dict[str, Any]) -> int:
    seq = s.append(event)
    assert seq is not None
    return seq


def invariant(s: Spool) -> SpoolStats:
    st = s.stats()
    assert st.accepted == st.delivered + st.pending + sum(st.dropped.values()), st
    return st


def drain(s: Spool) -> list[SpoolItem]:
    return s.lease(BIG, BIG)


def seqs(items: list[SpoolItem]) -> list[int]:
    return [it.seq for it in items]


def segments(path: Path, cls: int | None = None) -> list[Path]:
    pat = f"p{cls}-*.seg" if cls is not None else "p*-*.seg"
    return sorted(path.glob(pat))


def record_offsets(seg: Path) -> list[tuple[int, int]]:
    """(offset, end) of every record of a clean segment file."""
    data = seg.read_bytes()
    out, off = [], 0
    while off < len(data):
        (length,) = struct.unpack_from("<I", data, off)
        out.append((off, off + 8 + length))
        off += 8 + length
    assert off == len(data)
    return out


# --- API basics -------------------------------------------------------------------------


def test_priority_of() -> None:
    assert priority_of({"kind": "process.exec", "alert": True}) == 2
    assert priority_of({"kind": "net.flow", "alert": True}) == 2
    assert priority_of({"kind": "agent.status"}) == 2
    assert priority_of({"kind": "agent.loss"}) == 2
    assert priority_of({"kind": "net.flow"}) == 0
    assert priority_of({"kind": "net.dns"}) == 0
    assert priority_of({"kind": "file.write"}) == 0  # in-app audit activity: noise
    assert priority_of({"kind": "file.change"}) == 1  # integrity monitoring: not noise
    assert priority_of({"kind": "process.exec"}) == 1
    assert priority_of({"kind": "net.flowish"}) == 1
    assert priority_of({"kind": "process.exec", "alert": 1}) == 1  # only True is an alert
    assert priority_of({}) == 1


def test_errors_belong_to_the_hierarchy() -> None:
    assert issubclass(SpoolLocked, LwEmbedError)
    assert issubclass(SpoolError, LwEmbedError)


def test_round_trip(tmp_path: Path) -> None:
    s = make(tmp_path)
    events = [ev("process.exec", i) for i in range(3)]
    got = [s.append(e) for e in events]
    assert got == [1, 2, 3] and s.next_seq == 4
    items = drain(s)
    assert seqs(items) == [1, 2, 3]
    for e, it in zip(events, items, strict=True):
        assert it.priority == 1
        assert it.data == cbor2.dumps(dict(sorted({**e, "seq": it.seq}.items())))
        assert cbor2.loads(it.data) == {**e, "seq": it.seq}
    st = invariant(s)
    assert (st.accepted, st.pending, st.delivered) == (3, 3, 0)
    s.ack([1, 2, 3])
    st = invariant(s)
    assert (st.pending, st.delivered) == (0, 3)
    assert drain(s) == []
    s.close()


def test_append_does_not_mutate_the_event(tmp_path: Path) -> None:
    s = make(tmp_path)
    e = {"kind": "process.exec", "time": 1}
    s.append(e)
    assert e == {"kind": "process.exec", "time": 1}
    s.close()


def test_use_before_open_and_after_close(tmp_path: Path) -> None:
    s = Spool(str(tmp_path), max_bytes=1 << 20, segment_bytes=4096, sync_interval=0.1)
    with pytest.raises(SpoolError):
        s.append(ev("process.exec"))
    s.open()
    with pytest.raises(SpoolError):
        s.open()
    s.close()
    s.close()  # idempotent
    with pytest.raises(SpoolError):
        s.lease(1, 1)


def test_open_fails_cleanly_on_an_unusable_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("not a directory")
    with pytest.raises(SpoolError):
        make(tmp_path / "f" / "spool")


def test_directory_mode(tmp_path: Path) -> None:
    s = make(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o750 & ~_umask()
    s.close()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_lease_priority_order_and_limits(tmp_path: Path) -> None:
    s = make(tmp_path)
    kinds = ["net.flow", "process.exec", "agent.status", "file.change", "process.exit"]
    for i in range(20):
        s.append(ev(kinds[i % 5], i))
    s.append(ev("net.dns", 99, alert=True))
    items = drain(s)
    prios = [it.priority for it in items]
    assert prios == sorted(prios, reverse=True)
    for p in (0, 1, 2):
        cls = [it.seq for it in items if it.priority == p]
        assert cls == sorted(cls)
    assert items[0].priority == 2 and cbor2.loads(items[4].data)["alert"] is True
    s.release(seqs(items))
    # max_events
    assert seqs(s.lease(3, BIG)) == seqs(items)[:3]
    # max_bytes: stops at the first item that does not fit, but always returns one
    one = len(items[3].data)
    assert seqs(s.lease(BIG, 1)) == [items[3].seq]
    assert seqs(s.lease(BIG, 2 * one + 5)) == [items[4].seq, items[5].seq]
    invariant(s)
    s.close()


def test_leased_items_are_not_returned_again_until_released(tmp_path: Path) -> None:
    s = make(tmp_path)
    for i in range(10):
        s.append(ev("process.exec", i))
    first = s.lease(4, BIG)
    assert seqs(first) == [1, 2, 3, 4]
    assert seqs(s.lease(2, BIG)) == [5, 6]
    s.release([2, 3])
    assert seqs(s.lease(3, BIG)) == [2, 3, 7]  # released ones first: they are older
    s.ack([1, 2])
    s.drop([3], "http_400")
    s.release([4, 5, 6, 7])
    assert seqs(drain(s)) == [4, 5, 6, 7, 8, 9, 10]
    st = invariant(s)
    assert (st.delivered, st.dropped, st.pending) == (2, {"http_400": 1}, 7)
    s.close()


def test_drop_and_ack_semantics(tmp_path: Path) -> None:
    s = make(tmp_path)
    for i in range(6):
        s.append(ev("process.exec", i))
    items = s.lease(4, BIG)
    s.drop([items[0].seq, items[1].seq], "http_400")
    s.drop([items[2].seq], "http_413")
    s.ack([items[0].seq, 12345])  # already dropped / unknown: ignored
    s.release([items[3].seq])
    s.ack([items[3].seq])  # a released item can be acked without a new lease
    st = invariant(s)
    assert st.dropped == {"http_400": 2, "http_413": 1}
    assert st.delivered == 1 and st.pending == 2
    assert seqs(drain(s)) == [5, 6]
    with pytest.raises(ValueError):
        s.drop([5], "")
    s.close()
    s = make(tmp_path)  # counters survive a restart
    st = invariant(s)
    assert st.dropped == {"http_400": 2, "http_413": 1} and st.delivered == 1
    assert seqs(drain(s)) == [5, 6]
    s.close()


def test_segments_rotate_and_are_deleted_when_done(tmp_path: Path) -> None:
    s = make(tmp_path, segment_bytes=1024)
    for i in range(40):
        s.append(ev("process.exec", i))
    files = segments(tmp_path, 1)
    assert len(files) > 3
    assert all(f.stat().st_size <= 1024 for f in files)
    assert s.stats().segments == len(files)
    assert s.stats().bytes == sum(f.stat().st_size for f in files)
    items = drain(s)
    s.ack(seqs(items)[:20])
    s.sync()
    left = segments(tmp_path, 1)
    assert 0 < len(left) < len(files)
    s.ack(seqs(items)[20:])
    s.sync()
    assert segments(tmp_path, 1) == [files[-1]]  # the active one stays
    st = invariant(s)
    assert st.pending == 0 and st.segments == 1
    s.close()
    s = make(tmp_path)
    assert segments(tmp_path) == [] and s.stats().segments == 0 and s.stats().bytes == 0
    s.close()


def spool_fds(root: Path) -> int:
    """Open fds of this process that point into the spool directory (other tests' fds,
    closed by the garbage collector at any moment, must not move the count)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        n += target.startswith(str(root))
    return n


def test_open_fds_stay_bounded_with_many_segments(tmp_path: Path) -> None:
    s = make(tmp_path, segment_bytes=256)
    for i in range(600):
        s.append(ev(["net.flow", "process.exec", "agent.status"][i % 3], i))
    s.sync()
    assert len(segments(tmp_path)) > 150
    assert 1 <= spool_fds(tmp_path) <= 8  # lock, dir, journal, 3 active
    got = []
    while items := s.lease(7, BIG):
        got += seqs(items)
        assert spool_fds(tmp_path) <= 12
        s.ack(seqs(items))
        s.sync()
    assert sorted(got) == list(range(1, 601))
    s.close()
    assert spool_fds(tmp_path) == 0


# --- sequence numbers -------------------------------------------------------------------


def test_seq_monotonic_across_close_open(tmp_path: Path) -> None:
    s = make(tmp_path)
    for i in range(5):
        s.append(ev("process.exec", i))
    s = reopen(s, tmp_path)
    assert s.next_seq == 6
    assert s.append(ev("net.flow")) == 6
    s.close()


@pytest.mark.parametrize("crash", [False, True])
def test_seq_monotonic_after_everything_was_delivered(tmp_path: Path, crash: bool) -> None:
    s = make(tmp_path, segment_bytes=512)
    for i in range(30):
        s.append(ev(["net.flow", "process.exec", "agent.status"][i % 3], i))
    s.ack(seqs(drain(s)))
    s.sync()
    s.sync()  # deletes every sealed segment, journals the deletion
    s = reopen(s, tmp_path, crash=crash)
    assert segments(tmp_path) == [] or crash
    assert s.next_seq == 31
    assert s.append(ev("process.exec")) == 31
    invariant(s)
    s.close()


def test_seq_never_goes_back_even_without_state_file(tmp_path: Path) -> None:
    s = make(tmp_path)
    for i in range(10):
        s.append(ev("process.exec", i))
    s.ack(seqs(drain(s)))
    s.close()
    assert segments(tmp_path) == []
    (tmp_path / "state").write_bytes(os.urandom(100))
    s = make(tmp_path)
    assert s.next_seq == 11  # the journal header carries the high-water mark too
    s.close()


def test_unsynced_appends_keep_their_seqs_after_a_crash(tmp_path: Path) -> None:
    s = make(tmp_path)
    for i in range(10):
        s.append(ev("process.exec", i))
    s = reopen(s, tmp_path, crash=True)  # written to the OS, never synced
    assert s.next_seq == 11
    assert seqs(drain(s)) == list(range(1, 11))
    invariant(s)
    s.close()


# --- locking ----------------------------------------------------------------------------


def test_second_open_is_locked_out_until_close(tmp_path: Path) -> None:
    s = make(tmp_path)
    other = Spool(str(tmp_path), max_bytes=1 << 20, segment_bytes=4096, sync_interval=0.1)
    with pytest.raises(SpoolLocked):
        other.open()
    s.close()
    other.open()
    with pytest.raises(SpoolLocked):
        make(tmp_path)
    other.close()


# --- crashes ----------------------------------------------------------------------------


def test_crash_unsynced_acks_reappear(tmp_path: Path) -> None:
    s = make(tmp_path)
    for i in range(10):
        s.append(ev("process.exec", i))
    s.sync()
    items = s.lease(6, BIG)
    s.ack(seqs(items[:3]))
    s.drop([items[3].seq], "http_400")
    s.sync()
    s.ack(seqs(items[4:]))  # not synced: lost by the crash
    s = reopen(s, tmp_path, crash=True)
    st = invariant(s)
    assert st.delivered == 3 and st.dropped == {"http_400": 1} and st.pending == 6
    assert seqs(drain(s)) == [5, 6, 7, 8, 9, 10]
    s.close()


def test_maybe_sync_follows_the_clock(tmp_path: Path) -> None:
    clock = Clock()
    s = make(tmp_path, clock=clock)
    for i in range(4):
        s.append(ev("process.exec", i))
    s.ack([1, 2])
    s.lease(2, BIG)
    s.ack([1, 2])
    s.maybe_sync()  # too early: nothing written
    clock.t += 0.1
    s.maybe_sync()
    s = reopen(s, tmp_path, crash=True)
    assert invariant(s).delivered == 2
    assert seqs(drain(s)) == [3, 4]
    s.close()


def test_append_syncs_by_itself_when_the_interval_elapsed(tmp_path: Path) -> None:
    clock = Clock()
    s = make(tmp_path, clock=clock)
    s.append(ev("process.exec"))
    s.ack(seqs(s.lease(1, BIG)))
    clock.t += 0.2
    s.append(ev("process.exec"))  # syncs: the ack becomes durable
    s = reopen(s, tmp_path, crash=True)
    assert invariant(s).delivered == 1 and seqs(drain(s)) == [2]
    s.close()


_CHILD = r"""
import json, sys, time
from lw_embed.spool import Spool
s = Spool(sys.argv[1], max_bytes=1 << 20, segment_bytes=2048, sync_interval=0.1,
          clock=lambda: 0.0)
s.open()
appended = [s.append({"kind": "process.exec", "i": i}) for i in range(50)]
items = s.lease(20, 1 << 20)
synced = [it.seq for it in items[:10]]
s.ack(synced)
s.sync()
unsynced = [it.seq for it in items[10:]]
s.ack(unsynced)
appended += [s.append({"kind": "net.flow", "i": i}) for i in range(10)]
print(json.dumps({"appended": appended, "synced": synced, "unsynced": unsynced}), flush=True)
time.sleep(60)
"""


def test_sigkill_of_the_writer(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    s = make(tmp_path)
    st = invariant(s)
    assert st.delivered == 10 and st.pending == 50
    got = seqs(drain(s))
    assert sorted(got) == sorted(set(info["appended"]) - set(info["synced"]))
    assert set(info["unsynced"]) <= set(got)
    assert s.next_seq == max(info["appended"]) + 1
    s.close()


# --- damaged spools ---------------------------------------------------------------------


def _fill(tmp_path: Path, n: int, kind: str = "process.exec", **kw: Any) -> list[int]:
    s = make(tmp_path, **kw)
    out = [s.append(ev(kind, i)) for i in range(n)]
    s.close()
    return [q for q in out if q is not None]


def test_truncated_last_record(tmp_path: Path) -> None:
    appended = _fill(tmp_path, 10)
    (seg,) = segments(tmp_path)
    size = seg.stat().st_size
    with open(seg, "r+b") as f:
        f.truncate(size - 3)
    s = make(tmp_path)
    st = invariant(s)
    assert st.dropped == {"spool.corrupt": 1}
    assert st.quarantined_bytes > 0 and list((tmp_path / "quarantine").iterdir())
    assert seqs(drain(s)) == appended[:9]
    assert seg.stat().st_size == record_offsets(seg)[-1][1]
    s.close()
    s = make(tmp_path)  # counted once, not at every open
    assert invariant(s).dropped == {"spool.corrupt": 1}
    s.close()


def test_bit_flip_in_the_middle(tmp_path: Path) -> None:
    appended = _fill(tmp_path, 10)
    (seg,) = segments(tmp_path)
    offs = record_offsets(seg)
    data = bytearray(seg.read_bytes())
    data[offs[4][0] + 20] ^= 0x10  # inside the CBOR of the 5th record
    seg.write_bytes(bytes(data))
    s = make(tmp_path)
    st = invariant(s)
    assert st.dropped == {"spool.corrupt": 6}  # the damaged record and the 5 after it
    assert seqs(drain(s)) == appended[:4]
    pieces = list((tmp_path / "quarantine").iterdir())
    assert len(pieces) == 1 and pieces[0].stat().st_size == len(data) - offs[4][0]
    assert st.quarantined_bytes == pieces[0].stat().st_size
    s.close()


def test_bit_flip_in_a_length_field(tmp_path: Path) -> None:
    appended = _fill(tmp_path, 10)
    (seg,) = segments(tmp_path)
    offs = record_offsets(seg)
    data = bytearray(seg.read_bytes())
    data[offs[6][0] + 3] ^= 0x80  # length becomes huge: the rest cannot be walked
    seg.write_bytes(bytes(data))
    s = make(tmp_path)
    st = invariant(s)
    # the metadata knew 10 pending records, 6 are left: the larger count wins
    assert st.dropped == {"spool.corrupt": 4}
    assert seqs(drain(s)) == appended[:6]
    s.close()


def test_damage_in_records_already_acked_is_not_counted(tmp_path: Path) -> None:
    s = make(tmp_path)
    for i in range(10):
        s.append(ev("process.exec", i))
    s.ack(seqs(s.lease(BIG, BIG))[5:])  # the last 5 are delivered
    s.close()
    (seg,) = segments(tmp_path)
    offs = record_offsets(seg)
    with open(seg, "r+b") as f:
        f.truncate(offs[7][0] + 5)
    s = make(tmp_path)
    st = invariant(s)
    assert st.delivered == 5 and st.dropped == {} and st.pending == 5
    assert seqs(drain(s)) == [1, 2, 3, 4, 5]
    s.close()


def test_zero_length_segments(tmp_path: Path) -> None:
    _fill(tmp_path, 5)
    (seg,) = segments(tmp_path)
    (tmp_path / "p0-00000000000000f0.seg").write_bytes(b"")  # unknown, empty: just removed
    s = make(tmp_path)
    assert invariant(s).dropped == {} and segments(tmp_path) == [seg]
    s.close()
    seg.write_bytes(b"")  # known to hold 5 pending records
    s = make(tmp_path)
    st = invariant(s)
    assert st.dropped == {"spool.corrupt": 5} and drain(s) == []
    assert segments(tmp_path) == []
    assert s.next_seq == 0xF1  # the stray name still moved the high-water mark
    s.close()


def test_segment_of_random_garbage(tmp_path: Path) -> None:
    appended = _fill(tmp_path, 5)
    garbage = tmp_path / "p0-0000000000000100.seg"
    garbage.write_bytes(random.Random(7).randbytes(8192))
    s = make(tmp_path)
    st = invariant(s)
    assert st.dropped == {"spool.corrupt": 1}
    assert not garbage.exists()
    assert 0 < st.quarantined_bytes <= 8192
    assert seqs(drain(s)) == appended
    s.close()


def test_foreign_file_with_the_number_of_a_real_segment(tmp_path: Path) -> None:
    """A stray ``p0-N.seg`` beside the real ``p2-N.seg`` is quarantined; the real one
    keeps its events (it is not mistaken for a leftover evicted segment)."""
    s = make(tmp_path)
    appended = [s.append(ev("agent.status", i)) for i in range(4)]
    s.close()
    (real,) = segments(tmp_path, 2)
    foreign = tmp_path / real.name.replace("p2-", "p0-")
    foreign.write_bytes(random.Random(3).randbytes(512))
    s = make(tmp_path)
    st = invariant(s)
    assert st.dropped == {"spool.corrupt": 1}
    assert real.exists() and not foreign.exists()
    assert seqs(drain(s)) == appended
    s.close()


def test_deleted_segment(tmp_path: Path) -> None:
    s = make(tmp_path)
    for i in range(12):
        s.append(ev(["net.flow", "process.exec", "agent.status"][i % 3], i))
    s.ack([it.seq for it in s.lease(BIG, BIG) if it.priority == 2][:1])
    s.close()
    (alerts,) = segments(tmp_path, 2)
    alerts.unlink()
    s = make(tmp_path)
    st = invariant(s)
    assert st.dropped == {"spool.missing": 3} and st.delivered == 1
    assert [it.priority for it in drain(s)] == [1] * 4 + [0] * 4
    s.close()


@pytest.mark.parametrize("damage", ["missing", "garbage", "empty", "bitflip"])
def test_missing_or_garbage_state_file(tmp_path: Path, damage: str) -> None:
    s = make(tmp_path)
    for i in range(8):
        s.append(ev("process.exec", i))
    s.ack([1, 2])
    s.lease(2, BIG)
    s.ack([1, 2])
    s.close()
    state = tmp_path / "state"
    if damage == "missing":
        state.unlink()
    elif damage == "garbage":
        state.write_bytes(os.urandom(300))
    elif damage == "empty":
        state.write_bytes(b"")
    else:
        data = bytearray(state.read_bytes())
        data[-1] ^= 1
        state.write_bytes(bytes(data))
    s = make(tmp_path)
    st = invariant(s)
    # the acks are lost with the state: the records are pending again (duplicates are fine)
    assert st.pending == 8 and st.delivered == 0
    assert seqs(drain(s)) == list(range(1, 9))
    assert s.next_seq == 9
    if damage != "missing":
        assert any("state" in p.name for p in (tmp_path / "quarantine").iterdir())
    s.close()


def test_a_stale_journal_is_never_replayed_onto_a_rebuilt_state(tmp_path: Path) -> None:
    s = make(tmp_path)
    for i in range(4):
        s.append(ev("process.exec", i))
    s.sync()
    s.ack(seqs(s.lease(2, BIG)))
    s.sync()  # the journal now says 1 and 2 are delivered
    s._simulate_crash()
    old_journal = (tmp_path / "journal").read_bytes()
    (tmp_path / "state").write_bytes(b"garbage")
    s = make(tmp_path)  # rebuilt from the segments: 1-4 pending
    s._simulate_crash()
    # as if the crash came between the new state's rename and the new journal's
    (tmp_path / "journal").write_bytes(old_journal)
    s = make(tmp_path)
    st = invariant(s)
    assert st.delivered == 0 and st.pending == 4
    assert seqs(drain(s)) == [1, 2, 3, 4]
    s.close()


def test_garbage_journal(tmp_path: Path) -> None:
    s = make(tmp_path)
    for i in range(4):
        s.append(ev("process.exec", i))
    s.sync()
    s.ack(seqs(s.lease(2, BIG)))
    s.sync()
    s._simulate_crash()
    journal = tmp_path / "journal"
    data = bytearray(journal.read_bytes())
    data[-2] ^= 0xFF  # the last frame (the acks) is damaged
    journal.write_bytes(bytes(data) + os.urandom(50))
    s = make(tmp_path)
    st = invariant(s)
    assert st.pending == 4 and seqs(drain(s)) == [1, 2, 3, 4]
    s.close()


def test_quarantine_is_bounded(tmp_path: Path) -> None:
    _fill(tmp_path, 3)
    rnd = random.Random(1)
    for k in range(6):
        (tmp_path / f"p0-{0x1000 + k:016x}.seg").write_bytes(rnd.randbytes(1 << 20))
    s = make(tmp_path)
    st = invariant(s)
    assert st.dropped == {"spool.corrupt": 6}
    total = sum(p.stat().st_size for p in (tmp_path / "quarantine").iterdir())
    assert total == st.quarantined_bytes <= 4 << 20
    assert len(drain(s)) == 3
    s.close()


def test_corruption_found_by_a_lease_at_run_time(tmp_path: Path) -> None:
    s = make(tmp_path, segment_bytes=1024)
    for i in range(20):
        s.append(ev("process.exec", i))
    s.sync()
    first = segments(tmp_path, 1)[0]
    offs = record_offsets(first)
    data = bytearray(first.read_bytes())
    data[offs[2][0] + 12] ^= 0x01
    first.write_bytes(bytes(data))
    items = drain(s)  # never raises
    st = invariant(s)
    lost = len(offs) - 2
    assert st.dropped == {"spool.corrupt": lost}
    assert seqs(items) == [q for q in range(1, 21) if not 3 <= q <= len(offs)]
    assert st.quarantined_bytes > 0
    s.ack(seqs(items))
    s = reopen(s, tmp_path, crash=True)
    s.sync()
    assert invariant(s).dropped == {"spool.corrupt": lost}  # not counted again
    s.close()


def test_events_that_cannot_be_spooled(tmp_path: Path) -> None:
    s = make(tmp_path, max_bytes=4096)
    assert s.append({"kind": "process.exec", "bad": object()}) is None
    mixed: dict[Any, Any] = {"kind": "process.exec", 1: "mixed key types"}
    assert s.append(mixed) is None
    assert s.append(ev("process.exec", pad=5000)) is None
    assert s.append(ev("process.exec")) == 1  # dropped appends consume no seq
    st = invariant(s)
    assert st.dropped == {"spool.unencodable": 2, "spool.too_large": 1}
    s = reopen(s, tmp_path)
    assert invariant(s).dropped == {"spool.unencodable": 2, "spool.too_large": 1}
    s.close()


def test_write_errors_are_counted_and_the_spool_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = make(tmp_path)
    real = os.write

    def enospc(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def short(fd: int, data: bytes) -> int:
        return real(fd, data[:5])

    assert s.append(ev("process.exec", 1)) == 1
    for bad in (enospc, short):
        monkeypatch.setattr(os, "write", bad)
        assert s.append(ev("process.exec")) is None  # the active segment is sealed
        assert s.append(ev("net.flow")) is None  # a fresh segment: removed again at once
        monkeypatch.setattr(os, "write", real)
    assert s.append(ev("net.flow", 2)) == 2  # failed appends consume no seq
    assert s.append(ev("process.exec", 3)) == 3
    st = invariant(s)
    assert st.dropped == {"spool.io_error": 4} and st.pending == 3
    assert seqs(drain(s)) == [1, 3, 2]
    s = reopen(s, tmp_path)
    st = invariant(s)
    assert st.dropped == {"spool.io_error": 4} and st.pending == 3  # no torn tail left
    assert seqs(drain(s)) == [1, 3, 2]
    s.close()


# --- eviction ---------------------------------------------------------------------------


def _frame_len(kind: str) -> int:
    payload = cbor2.dumps(dict(sorted({**ev(kind), "seq": 1}.items())))
    return 16 + len(payload)


def test_eviction_order(tmp_path: Path) -> None:
    flen = _frame_len("process.exec")
    per_seg = 4
    s = make(tmp_path, max_bytes=flen * 24 + flen // 2, segment_bytes=flen * per_seg)
    noise = [put(s, ev("net.flow", i)) for i in range(8)]
    procs = [put(s, ev("process.exec", i)) for i in range(8)]
    alerts = [put(s, ev("agent.status", i)) for i in range(8)]
    assert s.stats().dropped == {}
    # a process event evicts the oldest noise segment first
    procs.append(put(s, ev("process.exec", 8)))
    st = invariant(s)
    assert st.dropped == {"spool.evicted": per_seg}
    first = seqs(drain(s))
    assert set(noise[per_seg:]) <= set(first) and set(procs) <= set(first)
    s.release(first)
    # more process events: the rest of the noise goes, then the oldest process segments
    for i in range(9, 20):
        procs.append(put(s, ev("process.exec", i)))
    left = set(seqs(drain(s)))
    assert not set(noise) & left
    assert set(alerts) <= left
    assert not set(procs[:per_seg]) & left
    s.release(sorted(left))
    # alerts evict process events (never other alerts) while process events remain
    for i in range(30):
        alerts.append(put(s, ev("agent.status", 100 + i)))
        items = drain(s)
        left_now = set(seqs(items))
        s.release(seqs(items))
        if any(it.priority == 1 for it in items):
            assert set(alerts) <= left_now
    items = drain(s)
    assert all(it.priority == 2 for it in items)
    s.release(seqs(items))
    max_bytes = flen * 24 + flen // 2
    s.sync()  # evicted segments are unlinked at sync time; until then bytes includes them
    while s.stats().bytes + flen + 1 <= max_bytes:  # fill up without evicting
        alerts.append(put(s, ev("agent.status", 200)))
    assert "spool.full" not in invariant(s).dropped
    # only alerts left: noise and process events are refused, alerts evict old alerts
    assert s.append(ev("net.flow", pad=60)) is None
    assert s.append(ev("process.exec", pad=60)) is None
    assert invariant(s).dropped["spool.full"] == 2
    evicted = invariant(s).dropped["spool.evicted"]
    assert s.append(ev("agent.status", 200, pad=60)) is not None
    s.sync()
    st = invariant(s)
    assert st.dropped["spool.evicted"] > evicted and st.bytes <= max_bytes
    assert min(seqs(drain(s))) > min(alerts)
    s.close()


def test_eviction_of_a_segment_with_leased_records(tmp_path: Path) -> None:
    flen = _frame_len("net.flow")
    s = make(tmp_path, max_bytes=flen * 8 + 10, segment_bytes=flen * 4)
    for i in range(8):
        s.append(ev("net.flow", i))
    leased = s.lease(3, BIG)
    assert seqs(leased) == [1, 2, 3]
    s.release([3])  # released: pending in memory, evicted like the unleased ones
    s.append(ev("process.exec"))  # evicts the first noise segment (seqs 1-4)
    st = invariant(s)
    assert st.dropped == {"spool.evicted": 2}  # 3 and 4; 1 and 2 are in flight
    assert seqs(drain(s)) == [9, 5, 6, 7, 8]
    s.ack([1])
    s.release([2])  # the send failed: its segment is gone, so it is dropped
    st = invariant(s)
    assert st.delivered == 1 and st.dropped == {"spool.evicted": 3}
    first = tmp_path / "p0-0000000000000001.seg"
    assert first.exists()
    s.sync()
    assert not first.exists()
    s.close()


def test_eviction_survives_a_crash(tmp_path: Path) -> None:
    flen = _frame_len("net.flow")
    s = make(tmp_path, max_bytes=flen * 8 + 10, segment_bytes=flen * 4)
    for i in range(8):
        s.append(ev("net.flow", i))
    s.lease(1, BIG)  # seq 1 in flight
    s.append(ev("process.exec"))
    s.sync()
    s = reopen(s, tmp_path, crash=True)
    st = invariant(s)
    assert st.dropped == {"spool.evicted": 4}  # 2-4 at eviction, 1 at recovery
    assert seqs(drain(s)) == [9, 5, 6, 7, 8]
    s.close()


def test_full_spool_evicts_nothing_it_does_not_have_to(tmp_path: Path) -> None:
    flen = _frame_len("agent.status")
    s = make(tmp_path, max_bytes=flen * 4 + 10, segment_bytes=flen * 2)
    for i in range(4):
        s.append(ev("agent.status", i))
    assert s.append(ev("net.flow")) is None
    assert s.append(ev("process.exec")) is None
    st = invariant(s)
    assert st.dropped == {"spool.full": 2} and st.pending == 4
    s.close()


# --- threads and bookkeeping ------------------------------------------------------------


def test_concurrent_writer_and_sender(tmp_path: Path) -> None:
    s = make(tmp_path, segment_bytes=8192)
    n = 3000
    done = threading.Event()

    def writer() -> None:
        for i in range(n):
            s.append(ev(["net.flow", "process.exec", "agent.status"][i % 3], i))
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    got: list[int] = []
    while not (done.is_set() and s.stats().pending == 0):
        items = s.lease(100, BIG)
        got += seqs(items)
        s.ack(seqs(items))
        s.maybe_sync()
    t.join()
    assert sorted(got) == list(range(1, n + 1))
    st = invariant(s)
    assert st.delivered == n and st.pending == 0
    s.close()


def test_syncs_from_a_third_thread(tmp_path: Path) -> None:
    """Writer, sender and a sync thread at once, with eviction and segment deletion."""
    s = make(tmp_path, max_bytes=64 << 10, segment_bytes=2048, clock=time.monotonic)
    n = 4000
    stop = threading.Event()
    errors: list[BaseException] = []

    def guarded(fn: Any) -> Any:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        return run

    def writer() -> None:
        for i in range(n):
            s.append(ev(["net.flow", "process.exec", "agent.status"][i % 3], i))

    def syncer() -> None:
        while not stop.is_set():
            s.sync()

    threads = [threading.Thread(target=guarded(f)) for f in (writer, syncer)]
    for t in threads:
        t.start()
    got: set[int] = set()
    while True:
        writing = threads[0].is_alive()
        items = s.lease(50, BIG)
        if not items and not writing:
            break
        got |= set(seqs(items))
        back = seqs(items[:5]) if writing else []  # a failed send now and then
        s.release(back)
        s.ack(seqs(items)[len(back) :])
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    items = drain(s)
    s.ack(seqs(items))
    st = invariant(s)
    assert st.pending == 0
    assert st.delivered + st.dropped.get("spool.evicted", 0) + st.dropped.get("spool.full", 0) == n
    s = reopen(s, tmp_path, crash=True)
    st = invariant(s)
    assert st.pending == 0 or st.pending <= len(got)  # only unsynced acks can come back
    s.close()


def test_journal_compaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_impl, "COMPACT_BYTES", 64)
    s = make(tmp_path, segment_bytes=1024)
    for i in range(30):
        s.append(ev("process.exec", i))
    items = drain(s)
    for it in items[::2]:  # out of order: one range per ack
        s.ack([it.seq])
        s.sync()
    s.drop([items[1].seq], "http_400")
    s.sync()
    assert (tmp_path / "journal").stat().st_size < 200
    s = reopen(s, tmp_path, crash=True)
    st = invariant(s)
    assert st.delivered == 15 and st.dropped == {"http_400": 1} and st.pending == 14
    assert seqs(drain(s)) == [it.seq for it in items[3::2]]
    s.close()


def test_stats_fields(tmp_path: Path) -> None:
    s = make(tmp_path)
    st = s.stats()
    assert st == SpoolStats(0, 0, 0, {}, 0, 0, 0)
    s.append(ev("process.exec"))
    st = s.stats()
    assert st.segments == 1 and st.bytes == segments(tmp_path)[0].stat().st_size
    st.dropped["x"] = 1  # a copy
    assert s.stats().dropped == {}
    s.close()


def test_frame_format(tmp_path: Path) -> None:
    s = make(tmp_path)
    s.append({"kind": "process.exec", "time": 5})
    s.close()
    data = segments(tmp_path)[0].read_bytes()
    length, crc = struct.unpack_from("<II", data)
    payload = data[8:]
    assert length == len(payload) and crc == zlib.crc32(payload)
    assert struct.unpack_from("<Q", payload)[0] == 1
    assert cbor2.loads(payload[8:]) == {"kind": "process.exec", "seq": 1, "time": 5}
