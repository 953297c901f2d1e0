"""Make an orphan and report who adopted it.

usage: orphan_ppid.py OUT

Forks a child that forks a grandchild (which sleeps up to 10 s) and exits at once, so the
grandchild is orphaned. Writes "<grandchild pid> <its PPid after reparenting> <my PPid>"
to OUT, then kills the grandchild (by pid) and exits 0.
"""

import os
import signal
import sys
import time

out = sys.argv[1]
r, w = os.pipe()
child = os.fork()
if child == 0:
    gc = os.fork()
    if gc == 0:
        os.close(r)
        os.close(w)
        time.sleep(10)
        os._exit(0)
    os.write(w, f"{gc}\n".encode())
    os._exit(0)
os.close(w)
gc = int(os.read(r, 64))
os.waitpid(child, 0)  # the grandchild's parent is gone: it has been reparented
with open(f"/proc/{gc}/status") as f:
    ppid = next(int(ln.split()[1]) for ln in f if ln.startswith("PPid:"))
with open(out, "w") as f:
    f.write(f"{gc} {ppid} {os.getppid()}\n")
os.kill(gc, signal.SIGKILL)
