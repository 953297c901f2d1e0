"""A tiny HTTP service to run under lw-embed in the Fargate and Cloud Run examples.

Standard library only, so it runs on the image's own Python, not in the agent's venv.

  GET /         a greeting
  GET /healthz  "ok" (for load balancer health checks)
  GET /spawn    runs `uname -a` (a fixed command, no input from the request), so there is
                a child process for the agent to report as process.exec / process.exit

Listens on $PORT (Cloud Run sets it; default 8080). On SIGTERM it stops accepting
connections and exits 0, which lw-embed passes on as the container's exit code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    server_version = "lw-embed-example/1"

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._reply(200, "ok\n")
        elif self.path == "/spawn":
            out = subprocess.run(["uname", "-a"], capture_output=True, text=True, timeout=5)
            self._reply(200, out.stdout or out.stderr)
        elif self.path == "/":
            self._reply(200, "hello from a workload watched by lw-embed\n")
        else:
            self._reply(404, "not found\n")

    def _reply(self, code: int, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> int:
    port = int(os.environ.get("PORT", "8080"))
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True

    def on_term(signum: int, _frame: object) -> None:
        print(f"app: signal {signum}, shutting down", flush=True)
        # shutdown() waits for serve_forever() to return, so call it from another thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    print(f"app: listening on :{port} (pid {os.getpid()})", flush=True)
    server.serve_forever()
    server.server_close()
    print("app: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
