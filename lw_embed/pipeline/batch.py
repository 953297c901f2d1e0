"""Batching: sequence numbers, size and age bounds, and the process records of a batch.

Interface: none (pure Python, no I/O). Events come in as wire dicts
(:meth:`lw_embed.events.Event.to_wire`), optionally with the process record of the
process they concern; :meth:`Batcher.take` hands back what
:func:`lw_embed.codec.encode_batch` needs. The monotonic clock is injected.

Sequence numbers: every event added gets the next number, starting at ``seq_start`` and
never reused by this batcher; a batch holds a contiguous range, and the event at index
``i`` of a batch has the number ``seq_first + i``. With the agent's instance id the range
is the batch's idempotency key.

Capability: none.

Cost: one ``cbor2.dumps`` per event (and per new process record) for the size estimate:
a few microseconds, done in C. ``take`` is O(events in the batch).

Failure modes: none; a single event larger than ``max_bytes`` makes a batch on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

#: Bytes of a batch that are not events or process records (agent, resource, seq, loss).
BATCH_OVERHEAD = 256


def encoded_size(obj: Mapping[str, Any]) -> int:
    """The CBOR size of ``obj`` (exact: cbor2's C encoder is cheaper than guessing)."""
    return len(cbor2.dumps(obj))


@dataclass(frozen=True, slots=True)
class Batch:
    """What one batch carries, ready for :func:`lw_embed.codec.encode_batch`."""

    seq_first: int
    seq_last: int
    processes: list[dict[str, Any]]
    events: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.events)


class Batcher:
    """Accumulates events until a batch is due (count, estimated bytes, or age)."""

    __slots__ = (
        "_bytes", "_clock", "_events", "_first_at", "_next_seq", "_procs", "_seq_first",
        "_size_of", "max_age", "max_bytes", "max_events",
    )  # fmt: skip

    def __init__(
        self,
        max_events: int,
        max_bytes: int,
        max_age: float,
        seq_start: int = 0,
        clock: Callable[[], float] = time.monotonic,
        size_of: Callable[[Mapping[str, Any]], int] = encoded_size,
    ) -> None:
        if max_events < 1 or max_bytes < 1 or max_age <= 0 or seq_start < 0:
            raise ValueError("batch bounds must be positive and seq_start >= 0")
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._clock = clock
        self._size_of = size_of
        self._next_seq = seq_start
        self._seq_first = seq_start
        self._events: list[dict[str, Any]] = []
        self._procs: dict[str, dict[str, Any]] = {}
        self._bytes = BATCH_OVERHEAD
        self._first_at = 0.0

    # -- state ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._events)

    @property
    def next_seq(self) -> int:
        """The number the next event will get."""
        return self._next_seq

    @property
    def pending_bytes(self) -> int:
        """Estimated encoded size of the batch so far (0 when empty)."""
        return self._bytes if self._events else 0

    # -- input ----------------------------------------------------------------------------
    def add(self, event: Mapping[str, Any], process: Mapping[str, Any] | None = None) -> int:
        """Add one event (and the record of its process); return its sequence number.

        A process already in the batch is kept once; a newer record replaces the older.
        """
        if not self._events:
            self._first_at = self._clock()
            self._seq_first = self._next_seq
        ev = event if type(event) is dict else dict(event)
        self._events.append(ev)
        self._bytes += self._size_of(ev)
        if process is not None:
            eid = process.get("exec_id")
            if isinstance(eid, str):
                rec = process if type(process) is dict else dict(process)
                if eid not in self._procs:
                    self._bytes += self._size_of(rec)
                self._procs[eid] = rec
        seq = self._next_seq
        self._next_seq += 1
        return seq

    # -- when -----------------------------------------------------------------------------
    def full(self) -> bool:
        """The count or size bound is reached."""
        return len(self._events) >= self.max_events or (
            bool(self._events) and self._bytes >= self.max_bytes
        )

    def deadline(self) -> float | None:
        """Clock time at which the oldest pending event reaches ``max_age`` (None: empty)."""
        return self._first_at + self.max_age if self._events else None

    def due(self) -> bool:
        """A batch should be taken now: full, or its oldest event is old enough."""
        if not self._events:
            return False
        return self.full() or self._clock() >= self._first_at + self.max_age

    # -- output ---------------------------------------------------------------------------
    def take(self) -> Batch | None:
        """Everything pending as one batch (None when nothing is pending)."""
        if not self._events:
            return None
        batch = Batch(
            seq_first=self._seq_first,
            seq_last=self._next_seq - 1,
            processes=list(self._procs.values()),
            events=self._events,
        )
        self._events = []
        self._procs = {}
        self._bytes = BATCH_OVERHEAD
        self._seq_first = self._next_seq
        return batch
