"""A real uvicorn serving a cachekit app on a loopback port, in a thread of the test process.

    with LiveServer(create_app(runner=runner)) as server:
        httpx.get(server.url + "/healthz")
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import httpx
import uvicorn


class LiveServer:
    def __init__(self, app, *, startup_timeout: float = 120.0, grace_s: int = 10) -> None:
        self.app = app
        self.startup_timeout = startup_timeout
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        from cachekit.pipelines.server.app import DrainingServer

        self._server = DrainingServer(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                     timeout_graceful_shutdown=grace_s))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> "LiveServer":
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
        raise TimeoutError(f"the server was not ready within {self.startup_timeout} s")

    def __exit__(self, *exc) -> None:
        self._server.handle_exit(signal.SIGINT, None)  # what Ctrl-C does
        self._thread.join(60)
        self._socket.close()
