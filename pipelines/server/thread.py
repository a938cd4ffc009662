"""`create_app` under a real uvicorn in a thread of this process, on a loopback port the OS picks.

For tests, benchmarks and notebooks that want a live server beside their own code:

    with ServerThread(create_app(runner=runner)) as server:
        httpx.get(server.url + "/healthz")

The socket is bound before the thread starts, so the port is known (and reserved) at once, and the context only
returns once `/healthz` says the model is warm. Leaving it does what Ctrl-C does to `cachekit serve`: in-flight
requests get the grace period, then the rest are cancelled.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from typing import Any

import httpx
import uvicorn

from .app import DrainingServer

__all__ = ["ServerThread"]


class ServerThread:
    def __init__(self, app: Any, *, startup_timeout: float = 120.0, grace_s: int = 10, backlog: int = 2048,
                 log_level: str = "warning") -> None:
        self.app = app
        self.startup_timeout = startup_timeout
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self._server = DrainingServer(uvicorn.Config(app, log_level=log_level, lifespan="on", backlog=backlog,
                                                     timeout_graceful_shutdown=grace_s))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("the server exited during start-up")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.__exit__()
        raise TimeoutError(f"the server was not ready within {self.startup_timeout} s")

    def __exit__(self, *exc: Any) -> None:
        self._server.handle_exit(signal.SIGINT, None)  # what Ctrl-C does
        self._thread.join(60)
        self._socket.close()
