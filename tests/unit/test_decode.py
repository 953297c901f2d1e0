"""FileSink writes real batch files; lw-embed decode turns them into JSON lines."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pytest

from lw_embed.codec import AgentIdentity, encode_batch
from lw_embed.decode import iter_events, main, to_json_line
from lw_embed.errors import RecordError
from lw_embed.events import AgentLoss, NetConnect
from lw_embed.sinks.files import FileSink, batch_name

AGENT = AgentIdentity(instance_id="inst1", version="0.1.0", mode="sidecar")


def _events(seq: int, n: int = 2) -> list[dict[str, object]]:
    return [
        NetConnect(
            time=1_000 + seq * 10 + i,
            exec_id=f"{seq:016x}",
            pid=seq,
            tid=seq,
            fd=i,
            family="inet",
            address="10.0.0.1",
            port=80 + i,
        ).to_wire()
        for i in range(n)
    ]


def _write(sink: FileSink, seq: int, n: int = 2) -> str:
    data = encode_batch(AGENT, {"container_id": "c"}, seq, seq + n - 1, [], _events(seq, n), {})
    return sink.write(data, AGENT.instance_id, seq)


def _run(*paths: str | Path) -> tuple[int, list[dict[str, object]], str]:
    out, err = io.StringIO(), io.StringIO()
    rc = main([str(p) for p in paths], out, err)
    return rc, [json.loads(line) for line in out.getvalue().splitlines()], err.getvalue()


def test_sink_writes_atomically_named_file(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b"
    sink = FileSink(str(directory))
    assert not directory.exists()  # created lazily
    path = _write(sink, 5)
    assert path == str(directory / "batch-inst1-000000000005.cbor")
    assert stat.S_IMODE(directory.stat().st_mode) & ~0o750 == 0
    assert os.listdir(directory) == ["batch-inst1-000000000005.cbor"]  # no temp left


def test_sink_rewrite_replaces(tmp_path: Path) -> None:
    sink = FileSink(str(tmp_path))
    _write(sink, 1, 1)
    _write(sink, 1, 3)
    assert len(os.listdir(tmp_path)) == 1
    assert len(list(iter_events([str(tmp_path)]))) == 3


def test_sink_errors_are_oserror_and_leave_no_temp(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(OSError):
        FileSink(str(blocker / "sub")).write(b"x", "i", 0)
    target = tmp_path / "dir"
    sink = FileSink(str(target))
    sink.write(b"x", "i", 0)
    (target / "batch-i-000000000001.cbor").mkdir()  # rename onto a directory fails
    with pytest.raises(OSError):
        sink.write(b"y", "i", 1)
    assert sorted(os.listdir(target)) == ["batch-i-000000000000.cbor", "batch-i-000000000001.cbor"]


def test_sink_recreates_a_vanished_directory(tmp_path: Path) -> None:
    target = tmp_path / "spool"
    sink = FileSink(str(target))
    sink.write(b"x", "i", 0)
    os.unlink(target / "batch-i-000000000000.cbor")
    target.rmdir()
    with pytest.raises(OSError):
        sink.write(b"x", "i", 1)
    sink.write(b"x", "i", 2)
    assert os.listdir(target) == ["batch-i-000000000002.cbor"]


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x" * 200])
def test_unsafe_instance_id_rejected(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        FileSink(str(tmp_path)).write(b"x", bad, 0)
    assert os.listdir(tmp_path) == []


def test_batch_name_sorts_by_sequence() -> None:
    names = [batch_name("i", n) for n in (10, 9, 100, 2)]
    assert sorted(names) == [batch_name("i", n) for n in (2, 9, 10, 100)]


def test_decode_directory_in_name_order(tmp_path: Path) -> None:
    sink = FileSink(str(tmp_path))
    for seq in (20, 1, 3):
        _write(sink, seq)
    (tmp_path / "notes.txt").write_text("not a batch")
    (tmp_path / "sub.cbor").mkdir()
    rc, events, err = _run(tmp_path)
    assert rc == 0 and err == ""
    assert [e["pid"] for e in events] == [1, 1, 3, 3, 20, 20]
    assert events[0] == _events(1)[0]


def test_decode_single_file_and_output_format(tmp_path: Path) -> None:
    path = _write(FileSink(str(tmp_path)), 1, 1)
    out, err = io.StringIO(), io.StringIO()
    assert main([path], out, err) == 0
    assert out.getvalue() == (
        '{"address":"10.0.0.1","exec_id":"0000000000000001","family":"inet","fd":0,'
        '"kind":"net.connect","pid":1,"port":80,"tid":1,"time":1010}\n'
    )


def test_truncated_file_reported_and_others_still_printed(tmp_path: Path) -> None:
    sink = FileSink(str(tmp_path))
    _write(sink, 1)
    bad = Path(_write(sink, 2))
    _write(sink, 3)
    bad.write_bytes(bad.read_bytes()[:-5])
    rc, events, err = _run(tmp_path)
    assert rc == 1
    assert [e["pid"] for e in events] == [1, 1, 3, 3]
    lines = err.splitlines()
    assert len(lines) == 1 and str(bad) in lines[0]


def test_garbage_file(tmp_path: Path) -> None:
    garbage = tmp_path / "junk.cbor"
    garbage.write_bytes(os.urandom(64) + b"\xff")
    good = _write(FileSink(str(tmp_path / "ok")), 1)
    rc, events, err = _run(garbage, good)
    assert rc == 1
    assert len(events) == 2
    assert str(garbage) in err and err.count("\n") == 1


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.cbor"
    empty.write_bytes(b"")
    rc, events, err = _run(empty)
    assert rc == 1 and events == [] and str(empty) in err


def test_missing_path_is_exit_2(tmp_path: Path) -> None:
    good = _write(FileSink(str(tmp_path)), 1)
    missing = tmp_path / "nope.cbor"
    rc, events, err = _run(good, missing)
    assert rc == 2 and events == []
    assert str(missing) in err


def test_no_paths_is_exit_2() -> None:
    rc, events, err = _run()
    assert rc == 2 and events == [] and err


def test_iter_events_raises_on_bad_file(tmp_path: Path) -> None:
    sink = FileSink(str(tmp_path))
    _write(sink, 1)
    (tmp_path / "batch-inst1-000000000002.cbor").write_bytes(b"\xa1")
    it = iter_events([str(tmp_path)])
    assert next(it)["pid"] == 1
    assert next(it)["pid"] == 1
    with pytest.raises(RecordError):
        next(it)


def test_iter_events_yields_events_as_stored(tmp_path: Path) -> None:
    loss = AgentLoss(time=5, totals={"b": 1, "a": 2}, accepted=9).to_wire()
    data = encode_batch(AGENT, {}, 0, 0, [], [loss], {"a": 2, "b": 1})
    path = FileSink(str(tmp_path)).write(data, "inst1", 0)
    assert list(iter_events([path])) == [loss]


def test_bytes_rendered_as_hex() -> None:
    assert to_json_line({"kind": "x", "time": 1, "raw": b"\x00\xff"}) == (
        '{"kind":"x","raw":"00ff","time":1}'
    )


def test_a_spool_directory_decodes_and_a_damaged_tail_is_reported(tmp_path: Path) -> None:
    from lw_embed.spool import Spool

    sp = Spool(str(tmp_path / "spool"), max_bytes=1 << 22, segment_bytes=1 << 20,
               sync_interval=0.1)  # fmt: skip
    sp.open()
    seqs = [sp.append({"kind": "process.exec", "time": i, "pid": i}) for i in range(5)]
    sp.close()
    out, err = io.StringIO(), io.StringIO()
    assert main([str(tmp_path / "spool")], out, err) == 0, err.getvalue()
    got = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["seq"] for e in got] == seqs and [e["pid"] for e in got] == list(range(5))
    seg = next(p for p in (tmp_path / "spool").iterdir() if p.suffix == ".seg")
    seg.write_bytes(seg.read_bytes()[:-3])
    out, err = io.StringIO(), io.StringIO()
    assert main([str(seg)], out, err) == 1
    assert len(out.getvalue().splitlines()) == 4 and seg.name in err.getvalue()
