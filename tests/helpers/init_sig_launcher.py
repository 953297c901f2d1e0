"""Start a program with SIGUSR1 ignored and exactly SIGUSR2 blocked.

usage: sig_launcher.py STATE_OUT -- PROG ARG...

SIGPIPE and SIGXFSZ (which Python itself ignores at start-up) are put back to SIG_DFL, as
a shell would have them. Right before execv the launcher's own SigIgn/SigBlk lines of
/proc/self/status are written to STATE_OUT, so a test can compare what PROG's children
see with what PROG was given.
"""

import os
import signal
import sys

state_out = sys.argv[1]
assert sys.argv[2] == "--"
argv = sys.argv[3:]
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_SETMASK, {signal.SIGUSR2})
with open("/proc/self/status") as f:
    lines = [ln for ln in f if ln.startswith(("SigIgn:", "SigBlk:"))]
with open(state_out, "w") as f:
    f.writelines(lines)
os.execv(argv[0], argv)
