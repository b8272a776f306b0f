"""``vllm serve`` as a child process for tests and benchmarks: started in its own process group
(vLLM's engine core and workers are its children), ready when ``/health`` answers, stopped
cleanly (SIGTERM, then SIGKILL of the whole group after ``stop_timeout_s``).

    with VllmServer(["MODEL", "--dtype", "float32"], env=dict(os.environ, CHUNKVALE_VLLM="1"),
                    log_path="server.log") as server:
        server.base_url   # http://127.0.0.1:PORT/v1 (server.url without /v1)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    """The server exited or did not come up; the message ends with its log's tail."""


class VllmServer:
    def __init__(self, args: list[str], *, env: dict, log_path: str | os.PathLike, start_timeout_s: float = 600,
                 stop_timeout_s: float = 60):
        self.args, self.env, self.log_path = list(args), env, Path(log_path)
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"  # the server (`vllm bench serve --base-url`)
        self.base_url = self.url + "/v1"  # its OpenAI API (the openai client's base_url)
        self.proc: subprocess.Popen | None = None
        self._deadline = 0.0

    def log_tail(self, chars: int | None = 6000) -> str:
        """The last `chars` characters of the server's log (None: all of it)."""
        try:
            return self.log_path.read_text(errors="replace")[-chars if chars else 0:]
        except OSError:
            return ""

    def launch(self) -> "VllmServer":
        """Starts the process and returns at once (``wait_ready`` next: several servers can start
        side by side)."""
        cmd = [sys.executable, "-m", "chunkvale.vllm_cli", "serve", *self.args, "--host", "127.0.0.1",
               "--port", str(self.port)]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        self._deadline = time.monotonic() + self.start_timeout_s
        return self

    def wait_ready(self) -> "VllmServer":
        """Returns once /health answers; ServerError (the server stopped) if it exits first or
        does not answer within start_timeout_s of its launch."""
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > self._deadline:
                self.stop()
                raise ServerError(f"vllm serve did not come up in {self.start_timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(1)

    def start(self) -> "VllmServer":
        return self.launch().wait_ready()

    def stop(self) -> int | None:
        """SIGTERM (vLLM shuts its engine down), then SIGKILL of the group; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # children left behind (engine core, workers) go with the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.wait()

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
