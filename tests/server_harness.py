"""The real uvicorn server in a thread on a free loopback port, for the server tests.

    with serving(create_app(engine, "model")) as url:
        httpx.get(url + "/health")
"""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

START_TIMEOUT_S = 60.0


@contextmanager
def serving(app: Any, start_timeout: float = START_TIMEOUT_S) -> Iterator[str]:
    """Serve the ASGI `app` on 127.0.0.1 (a port the OS picks) until the block ends; yields the base URL
    (``http://127.0.0.1:PORT``, no trailing slash). The server is asked to stop and joined on the way out."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
