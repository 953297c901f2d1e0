"""Print "zombies N": the number of processes in state Z in this /proc (details to stderr).

usage: init_count_zombies.py [COMM]

With COMM, first wait (up to 10 s) until no live process named COMM is left, then 200 ms
more, so the count is taken 200 ms after the last of those could have exited whatever
the machine's load; "waited S" (seconds) is printed before the count.
"""

import os
import sys
import time


def procs() -> list[tuple[int, str, str, int]]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        out.append((int(name), comm, state, int(ppid)))
    return out


if len(sys.argv) > 1:
    t0 = time.monotonic()
    end = t0 + 10
    while time.monotonic() < end and any(c == sys.argv[1] and s != "Z" for _, c, s, _ in procs()):
        time.sleep(0.01)
    time.sleep(0.2)
    print(f"waited {time.monotonic() - t0:.2f}", flush=True)
found = [(pid, comm, ppid) for pid, comm, state, ppid in procs() if state == "Z"]
for pid, comm, ppid in found:
    print(f"zombie pid={pid} comm={comm} ppid={ppid}", file=sys.stderr)
print(f"zombies {len(found)}", flush=True)
