"""The durable spool: events are accepted here before anything is sent.

Interface: plain files in one directory, no special kernel interface; ``flock(2)`` on
``<dir>/lock`` keeps a second process (or a second :class:`Spool` in this one) out, and
``fdatasync(2)`` makes writes durable. Capability: a writable directory, nothing else.

Use: the worker thread calls :meth:`Spool.append` (which also calls
:meth:`Spool.maybe_sync`); the sender thread calls :meth:`~Spool.lease`, then
:meth:`~Spool.ack`, :meth:`~Spool.drop` or :meth:`~Spool.release`. Whoever owns the spool
calls :meth:`~Spool.maybe_sync` on its idle tick too (at least every ``sync_interval``),
so the last appends of a burst and the acks reach the disk. The fdatasyncs run outside
the spool's lock: calling maybe_sync from a timer thread keeps them off the worker (append
syncs itself only when that thread is late, and skips while a sync is running).
Invariant, always (right after :meth:`~Spool.open` following a crash too)::

    accepted == delivered + pending + sum(dropped.values())

An event is *accepted* once its record is written to the OS (one ``os.write`` per
append, no user-space buffer); group ``fdatasync`` at least every ``sync_interval``.

On-disk layout::

    <dir>/lock                     flock; holds the owner's pid (informational)
    <dir>/p<C>-<N>.seg             segment of priority class C (0, 1, 2) whose first record
                                   has seq N (16 hex digits): frames, appended only
    <dir>/state                    snapshot of counters and per-segment metadata
    <dir>/journal                  what happened since the snapshot, one frame per sync
    <dir>/quarantine/<ns>-<k>-<what>   copies of damaged bytes (at most 4 MiB, oldest go)

A segment record is ``length (u32 LE) | crc32 (u32 LE) | payload`` with payload ``seq (u64
LE) | CBOR`` (the seq up front so lease and recovery never decode CBOR); the CBOR is
``cbor2.dumps(dict(sorted({**event, "seq": seq}.items())))``, which is what
:attr:`SpoolItem.data` returns. ``state`` and ``journal`` use the same frames around CBOR
(see :mod:`lw_embed.spool._journal`).

Classes and segments: each class has one active segment, rotated when the next record
would pass ``segment_bytes``. Records are identified on disk by (segment, byte offset);
"done" (acked or dropped) records are kept per segment as merged offset ranges, so
in-order acks cost one range per segment. Memory is proportional to the number of
segments, the done ranges and what is leased or released, never to the backlog:
:meth:`Spool.lease` reads records on demand through a per-segment cursor with a 256 KiB
read buffer (released items are kept in memory until leased again). Ack/drop/release of a
seq that is neither leased nor released is ignored. A segment is deleted once all its
records are done and it is not active; the unlink happens in the next sync, after the
journal saying so is durable.

Durability: :meth:`Spool.sync` fdatasyncs the segments written since the last sync, then
appends one journal frame (acks and drops as offset ranges, evictions, the seq high-water
mark, segment sizes) and fdatasyncs it. When the journal passes 256 KiB the sync writes a
new snapshot instead (tmp + rename) and starts a fresh journal; :meth:`~Spool.open` and
:meth:`~Spool.close` always do. After a crash, at most the acks/drops/evictions of the last
``sync_interval`` are lost: those records are pending again (sent twice; the receiver
dedupes by seq). Sequence numbers never go backwards: ``next_seq`` is persisted in every
journal frame and snapshot, and :meth:`~Spool.open` takes ``max(persisted, highest seq or
segment name found) + 1``.

Recovery at open (one segment at a time, 1 MiB read buffer): the intact prefix of every
segment is kept; the first record that is torn, too long or fails its CRC and everything
after it are copied to the quarantine and cut off. Counting rule for
``dropped["spool.corrupt"]``: walk the damaged region by its length fields (CRC not
required), count each walked record that was not already done, plus 1 if an unwalkable
remainder is left (a torn record, garbage: "1 per damaged region"); if the metadata knew
more pending records in that segment than are left, count the larger figure. A segment
file that is gone while the metadata knew it counts its pending records (as of the last
sync) as ``spool.missing``; files the metadata never saw cannot be counted. A missing or
damaged ``state`` (quarantined) restarts counters from the segments: every record is
pending again, delivered/dropped restart at 0. Open never fails on damaged content, only
on an unusable directory (:class:`SpoolError`) or a held lock (:class:`SpoolLocked`).

Bounded size: when a record would push the bytes of live segments past ``max_bytes``, the
oldest segment of the lowest class <= the new event's class is evicted (the active
segment of a class too when it is all that is left of it), until it fits; alerts (class 2)
are never evicted while lower classes hold segments. Its unleased pending records count
as ``spool.evicted`` at once; its leased records resolve normally (ack: delivered, drop:
the reason, release: ``spool.evicted``) and the file is deleted after the last one, its
bytes no longer counting against ``max_bytes`` meanwhile (so the directory may exceed
``max_bytes`` by evicted-but-leased segments until the next sync). If evicting every
segment of the allowed classes would not make room, nothing is evicted and the new event
is dropped as ``spool.full``. Other append drops: ``spool.too_large`` (the record alone
exceeds max_bytes), ``spool.unencodable`` (cbor2 cannot encode the event), and
``spool.io_error`` (write failed; the segment is sealed). Dropped appends return None and
do not consume a seq.

Cost: one cbor2 encode, one crc32 and one ``write(2)`` per append (about 200k appends/s
of 150-byte events on one core, see bench/spool_bench.py); one fdatasync per dirty segment
and one of the journal per sync interval; a lease costs a ``pread`` per 256 KiB; recovery
reads every segment once (about 0.7 us per record). Open fds: the lock, the directory,
the journal, one per active segment, and the segments a lease is reading (sealed ones
are closed after their sync). :meth:`~Spool.close` seals the active segments: the next
open starts new ones.

Failure modes: never raises on damaged data; a corrupt record found by a lease at run
time is handled like recovery does (quarantined, counted, segment cut); a segment that
vanished at run time counts its unread pending records as ``spool.missing``; a failed
metadata write is retried as a full snapshot at the next sync. :class:`SpoolError` for
use before :meth:`~Spool.open` or after :meth:`~Spool.close`.
"""

from lw_embed.spool._api import (
    CORRUPT,
    EVICTED,
    FULL,
    IO_ERROR,
    MISSING,
    TOO_LARGE,
    UNENCODABLE,
    SpoolError,
    SpoolItem,
    SpoolLocked,
    SpoolStats,
    priority_of,
)
from lw_embed.spool._spool import Spool

__all__ = [
    "CORRUPT",
    "EVICTED",
    "FULL",
    "IO_ERROR",
    "MISSING",
    "TOO_LARGE",
    "UNENCODABLE",
    "Spool",
    "SpoolError",
    "SpoolItem",
    "SpoolLocked",
    "SpoolStats",
    "priority_of",
]
