"""A process that takes 1 s to shut down on SIGTERM.

usage: slow_term.py READY DONE

Writes its pid to READY once the handler is in place. On the first SIGTERM it ignores
further TERMs, sleeps 1 s, writes "done" to DONE and exits 0. Never runs longer than 30 s.
"""

import os
import signal
import sys
import time

ready, done = sys.argv[1], sys.argv[2]


def on_term(_signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(1.0)
    with open(done, "w") as f:
        f.write("done\n")
    os._exit(0)


signal.signal(signal.SIGTERM, on_term)
with open(ready + ".tmp", "w") as f:
    f.write(f"{os.getpid()}\n")
os.rename(ready + ".tmp", ready)
end = time.monotonic() + 30
while time.monotonic() < end:
    time.sleep(0.05)
sys.exit(99)
