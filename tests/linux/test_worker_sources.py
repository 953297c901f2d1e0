"""The worker's source seam (lw_embed.sources.base): a source's fd wakes the loop, its
events reach the batches, it sees core records, and a broken source is reported, not fatal.

The worker runs in this process (its loop in the main thread, as in the worker process);
a thread plays the core: it writes records and closes the pipe once the source was polled.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

from lw_embed.config import config_from_dict
from lw_embed.events import Event
from lw_embed.records import R, frame
from lw_embed.runtime.worker import Spec, Worker
from lw_embed.sources import base
from tests.linux.test_worker import batches, cfg_dict, eid, events_of, exec_rec, of_kind

pytestmark = pytest.mark.linux


@dataclass(frozen=True, slots=True)
class Ping:
    kind: ClassVar[str] = "test.ping"
    time: int
    payload: str
    exec_id: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wire = {"exec_id": self.exec_id, "kind": self.kind, "payload": self.payload,
                "time": self.time}  # fmt: skip
        return {k: v for k, v in wire.items() if v is not None}


class PipeSource:
    """Emits one ping per line written to its pipe; pings the exec_id of each EXEC seen."""

    name = "testpipe"

    def __init__(self, fail_on: str = "") -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK)
        self.polled = threading.Event()
        self.fail_on = fail_on
        self.closed = False

    def fileno(self) -> int | None:
        return self.r

    def next_due(self) -> float | None:
        return None

    def poll(self, now: float) -> Iterable[Event]:
        data = os.read(self.r, 4096)
        self.polled.set()
        for line in data.decode().split():
            if line == self.fail_on:
                raise RuntimeError("boom")
            yield Ping(time=1, payload=line)

    def observe(self, rec: Sequence[Any]) -> Iterable[Event]:
        if rec[0] == R.EXEC:
            yield Ping(time=rec[1], payload="exec", exec_id=eid(rec[2], rec[4]))

    def technique(self) -> tuple[str, str]:
        return "pipe", "a test source"

    def metrics(self) -> Mapping[str, int | float]:
        return {"testpipe.fd": self.r}

    def losses(self) -> Mapping[str, int]:
        return {"testpipe.dropped": 3}

    def close(self) -> Iterable[Event]:
        self.closed = True
        os.close(self.r)
        os.close(self.w)
        return [Ping(time=2, payload="bye")]


def run_worker(tmp: Path, sources: Sequence[Any] | None, script: Any) -> list[dict[str, Any]]:
    cfg = config_from_dict(cfg_dict(tmp))
    spec = Spec(config=cfg, core_pid=os.getpid(), instance_id="seam", mode="wrapper",
                scope="none", version="test")  # fmt: skip
    r, w = os.pipe()
    worker = Worker(spec, r, sources=sources)
    t = threading.Thread(target=script, args=(w,), daemon=True)
    t.start()
    assert worker.run() == 0
    t.join(10)
    os.close(r)
    return events_of(batches(tmp / "out"))


def test_source_fd_records_and_close(tmp_path: Path) -> None:
    src = PipeSource()

    def core(w: int) -> None:
        os.write(w, frame(R.CAPS, 1, {"techniques": {"processes": "ptrace"}}))
        os.write(w, exec_rec(5, 4242, "/bin/true"))
        os.write(src.w, b"alpha beta\n")
        assert src.polled.wait(10)
        os.close(w)

    evs = run_worker(tmp_path, [src], core)
    pings = [e["payload"] for e in of_kind(evs, "test.ping")]
    assert sorted(pings) == ["alpha", "beta", "bye", "exec"]
    assert [e["exec_id"] for e in of_kind(evs, "test.ping") if e["payload"] == "exec"] == [
        eid(4242, 4242)
    ]
    caps = of_kind(evs, "agent.capabilities")[0]["report"]
    assert caps["techniques"] == {"processes": "ptrace", "testpipe": "pipe"}
    assert caps["reasons"]["testpipe"] == "a test source"
    assert of_kind(evs, "agent.loss")[-1]["totals"]["testpipe.dropped"] == 3
    assert src.closed


def test_failing_source_is_counted_and_keeps_running(tmp_path: Path) -> None:
    src = PipeSource(fail_on="bad")

    def core(w: int) -> None:
        os.write(src.w, b"bad\n")
        assert src.polled.wait(10)
        src.polled.clear()
        os.write(src.w, b"good\n")
        assert src.polled.wait(10)
        os.close(w)

    evs = run_worker(tmp_path, [src], core)
    assert sorted(e["payload"] for e in of_kind(evs, "test.ping")) == ["bye", "good"]
    assert of_kind(evs, "agent.loss")[-1]["totals"]["testpipe.error"] == 1


def test_unbuildable_source_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "FACTORIES", {
        "broken": "lw_embed.no_such_module:factory",
        "off": "tests.linux.test_worker_sources:off_factory",
    })  # fmt: skip

    def core(w: int) -> None:
        os.write(w, frame(R.CAPS, 1, {"techniques": {}}))
        os.close(w)

    evs = run_worker(tmp_path, None, core)
    caps = of_kind(evs, "agent.capabilities")[0]["report"]
    assert caps["techniques"] == {"broken": "none"}
    assert "ModuleNotFoundError" in caps["reasons"]["broken"]


def off_factory(ctx: base.SourceContext) -> None:
    assert ctx.mode == "wrapper"
    return None  # the source is off in this config
