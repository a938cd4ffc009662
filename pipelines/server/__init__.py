"""The HTTP and WebSocket server over the streaming batch runner (`cachekit serve`; needs `cachekit[serve]`).

    from cachekit.pipelines.server import create_app
    app = create_app()                      # the bundled digits model; run it with uvicorn

Imported lazily, so `cachekit serve --help` works, and says what to install, without FastAPI.
"""

from typing import Any

__all__ = ["create_app", "ServerLimits", "ServerThread"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServerLimits":
        from .limits import ServerLimits

        return ServerLimits
    if name == "ServerThread":
        from .thread import ServerThread

        return ServerThread
    raise AttributeError(name)
