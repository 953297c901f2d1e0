"""A host app for tests/linux/test_inapp.py: ``inapp_app.py SCENARIO OUT DATA [ARG]``.

Each scenario starts the in-app agent with ``output=OUT``, ``data_dir=DATA``, does some
work and prints one JSON line of what it saw (the test reads the batches in OUT).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import lw_embed

SCENARIO, OUT, DATA = sys.argv[1], sys.argv[2], sys.argv[3]
ARG = sys.argv[4] if len(sys.argv) > 4 else ""
FAST: dict[str, Any] = {"processes_reconcile_interval": 0.1, "output_batch_max_age": 0.1}


def start(**extra: Any) -> bool:
    return lw_embed.start(output=OUT, data_dir=DATA, **{**FAST, **extra})


def touch(path: str) -> None:
    with open(path, "w") as f:
        f.write("x")


def report(**kv: Any) -> None:
    print(json.dumps(kv), flush=True)


def basic() -> None:
    start()
    child = subprocess.Popen(["/bin/sleep", "1"])
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    cli.close()
    srv.close()
    touch(os.path.join(ARG, "written.txt"))
    os.rename(os.path.join(ARG, "written.txt"), os.path.join(ARG, "renamed.txt"))
    os.remove(os.path.join(ARG, "renamed.txt"))
    child.wait()
    report(port=port, child=child.pid, flushed=lw_embed.flush(10), stopped=lw_embed.stop(10))


def hostile() -> None:
    start()
    odd: list[Any] = [(), (None,), (1, 2, 3), ("x",) * 10, (object(),), (b"\xff", None, "w"),
                      (float("nan"),), ([1, [2]], {"a": 1})]  # fmt: skip

    class Evil:
        def __fspath__(self) -> str:
            raise RuntimeError("evil path")

        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("evil attribute")

    odd += [(Evil(), Evil(), Evil()), (Evil(),)]
    raised = 0
    for event in ("subprocess.Popen", "os.exec", "os.posix_spawn", "os.system",
                  "socket.connect", "socket.bind", "open", "os.remove", "os.rename", "import"):
        for args in odd:
            try:
                sys.audit(event, *args)
            except Exception:
                raised += 1
    touch(os.path.join(ARG, "after.txt"))  # the agent still works
    report(raised=raised, flushed=lw_embed.flush(10), stopped=lw_embed.stop(10))


def queue() -> None:
    start(inapp_queue_max=16)
    n = int(ARG)
    sys.setswitchinterval(5.0)  # the agent thread gets no GIL: the queue fills up
    for i in range(n):
        sys.audit("os.remove", f"/nonexistent/q{i}", -1)
    sys.setswitchinterval(0.005)
    report(n=n, flushed=lw_embed.flush(10), stopped=lw_embed.stop(10))


def restart() -> None:
    first = start()
    again = start()  # harmless
    touch(os.path.join(ARG, "one.txt"))
    stopped = lw_embed.stop(10)
    touch(os.path.join(ARG, "between.txt"))  # no agent: not reported
    restarted = start()
    touch(os.path.join(ARG, "two.txt"))
    report(first=first, again=again, stopped=stopped, restarted=restarted,
           flushed=lw_embed.flush(10), stopped2=lw_embed.stop(10))  # fmt: skip


def fork() -> None:
    start()
    n = int(ARG.split(":")[1])
    d = ARG.split(":")[0]
    for i in range(n):  # some still queued at the fork, most likely
        touch(os.path.join(d, f"pre-{i}"))
    pid = os.fork()
    if pid == 0:
        for i in range(n):
            touch(os.path.join(d, f"child-{i}"))
        ok = lw_embed.flush(10) and lw_embed.stop(10)
        os._exit(0 if ok else 3)
    for i in range(n):
        touch(os.path.join(d, f"parent-{i}"))
    _, status = os.waitpid(pid, 0)
    report(child=pid, child_status=status, flushed=lw_embed.flush(10), stopped=lw_embed.stop(10))


def sigterm() -> None:
    marker = os.path.join(ARG, "handler-ran")

    def handler(signum: int, frame: Any) -> None:
        caller = sys._getframe(1).f_code.co_name  # the agent's handler, when chained
        with open(marker, "w") as f:
            f.write(caller)
        sys.exit(0)

    if os.environ.get("HANDLER_FIRST") == "1":
        signal.signal(signal.SIGTERM, handler)
        start(inapp_sigterm=True)
    else:
        start(inapp_sigterm=True)
        signal.signal(signal.SIGTERM, handler)
    touch(os.path.join(ARG, "before-term.txt"))
    report(ready=True)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        time.sleep(0.05)


def sigterm_default() -> None:
    start(inapp_sigterm=True)
    touch(os.path.join(ARG, "before-term.txt"))
    report(ready=True)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        time.sleep(0.05)


def exit_budget() -> None:
    start(backend=ARG, token="test-token", shutdown_flush=1.0, backend_connect_timeout=0.2)
    for i in range(50):
        sys.audit("os.remove", f"/nonexistent/e{i}", -1)
    report(done=time.monotonic())
    # exit: atexit stops the agent within shutdown.flush, the backend being down


def many_fds() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]  # the agent's are >= 1024
    start()
    touch(os.path.join(ARG, "with-many-fds.txt"))
    report(max_fd=max(fds), flushed=lw_embed.flush(10), stopped=lw_embed.stop(10))


def loop_fails() -> None:
    from lw_embed.runtime import embedded, pipeline
    from lw_embed.sources import audit

    def broken(self: Any) -> None:
        raise RuntimeError("injected loop failure")

    pipeline.Pipeline._tick = broken  # type: ignore[method-assign]
    start()
    end = time.monotonic() + 20
    while embedded.status()["running"] and time.monotonic() < end:
        time.sleep(0.02)
    report(status=embedded.status(), hook_on=audit.STATE.on)


def metadata_thread() -> None:
    """ECS metadata served by this process: the agent's own requests are not the host's."""
    from lw_embed.sources import audit

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    os.environ["ECS_CONTAINER_METADATA_URI_V4"] = f"http://127.0.0.1:{port}/v4/x"
    start()
    srv.settimeout(10)
    conn, _ = srv.accept()  # the identity thread's request
    conn.close()
    srv.close()
    mine = socket.create_connection(("127.0.0.1", int(ARG)))  # one of the host's own
    mine.close()
    flushed, stopped = lw_embed.flush(10), lw_embed.stop(10)
    end = time.monotonic() + 10
    while audit.STATE.own and time.monotonic() < end:  # the agent's threads end
        time.sleep(0.02)
    report(port=port, own_after=len(audit.STATE.own), flushed=flushed, stopped=stopped)


def fork_exit() -> None:
    """Forked children that end with os._exit: their spooled events still arrive."""
    start(output_batch_max_age=30.0)  # children's partial batches wait: still spooled
    pids = []
    for n in range(2):
        pid = os.fork()
        if pid == 0:
            time.sleep(0.5)  # the child's agent is up (FORK_START_DELAY)
            touch(os.path.join(ARG, f"child-{n}.txt"))
            lw_embed.flush(1.0)  # into its spool; not shipped (the batch waits)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    time.sleep(1.0)  # the reconciler sees them gone and adopts their spools
    report(children=pids, flushed=lw_embed.flush(10), stopped=lw_embed.stop(10))


def exec_now() -> None:
    from lw_embed.sources import audit

    audit.EXEC_WAIT = float(os.environ.get("EXEC_WAIT", audit.EXEC_WAIT))
    start()
    lw_embed.flush(10)  # the agent is up
    os.execv("/bin/true", ["/bin/true", ARG])


def drain() -> None:
    start()
    report(flushed=lw_embed.flush(10), stopped=lw_embed.stop(10))


def child_python() -> None:
    """Started by sitecustomize (LW_EMBED_AUTOSTART=1): a Python child starts no agent."""
    code = ("import os, sys, time; time.sleep(0.6); print(int('lw_embed.runtime.embedded' "
            "in sys.modules), os.environ.get('LW_EMBED_AUTOSTART', ''))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    report(child_agent=out[0] == "1", child_env=out[1:], flushed=lw_embed.flush(10),
           stopped=lw_embed.stop(10))


SCENARIOS = {"basic": basic, "hostile": hostile, "queue": queue, "restart": restart,
             "fork": fork, "sigterm": sigterm, "sigterm_default": sigterm_default,
             "exit_budget": exit_budget, "many_fds": many_fds, "loop_fails": loop_fails,
             "metadata_thread": metadata_thread, "fork_exit": fork_exit,
             "exec_now": exec_now, "drain": drain, "child_python": child_python}  # fmt: skip

if __name__ == "__main__":
    SCENARIOS[SCENARIO]()
