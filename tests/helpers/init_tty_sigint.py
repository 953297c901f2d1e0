"""On a terminal: print "ready fg=<is my group the foreground one>", then wait for SIGINT.

On SIGINT print "got SIGINT" and exit 0. Exit 3 if nothing came within 20 s.
"""

import os
import signal
import sys
import time

got = False


def on_int(_signum: int, _frame: object) -> None:
    global got
    got = True


signal.signal(signal.SIGINT, on_int)
fg = os.tcgetpgrp(0) == os.getpgrp()
print(f"ready fg={fg}", flush=True)
end = time.monotonic() + 20
while not got and time.monotonic() < end:
    time.sleep(0.02)
if got:
    print("got SIGINT", flush=True)
    sys.exit(0)
sys.exit(3)
