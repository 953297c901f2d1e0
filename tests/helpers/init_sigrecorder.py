"""Record every signal received, in order, one number per line; exit after SIGTERM.

usage: sigrecorder.py OUT READY [EXIT_CODE]

Handlers for TERM, INT, HUP, USR1, USR2, WINCH and SIGRTMIN+3 are installed, then READY
is written (so a test knows it may start sending). On SIGTERM the process exits with
EXIT_CODE (default 0). It never runs longer than 30 s.
"""

import os
import signal
import sys
import time

out, ready = sys.argv[1], sys.argv[2]
exit_code = int(sys.argv[3]) if len(sys.argv) > 3 else 0
SIGNALS = [
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGRTMIN + 3,
]
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
stop = False


def on_signal(signum: int, _frame: object) -> None:
    global stop
    os.write(fd, f"{signum}\n".encode())
    if signum == signal.SIGTERM:
        stop = True


for s in SIGNALS:
    signal.signal(s, on_signal)
with open(ready + ".tmp", "w") as f:
    f.write(f"{os.getpid()}\n")
os.rename(ready + ".tmp", ready)

end = time.monotonic() + 30
while not stop and time.monotonic() < end:
    time.sleep(0.02)
sys.exit(exit_code if stop else 99)
