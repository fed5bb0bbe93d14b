"""In-memory stand-ins for what the protocol objects are given by asyncio and uvicorn, so that
tests feed `HttpConnection` and `Http2Connection` bytes and read what they write."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from opserve.frontends.http.protocol import Exchange


class Transport(asyncio.Transport):
    """A transport that keeps what is written."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()

    def write(self, data: Any) -> None:
        self.written += data

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.written += part

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _App:
    def __init__(self, answer_now: Callable[[Exchange], bool]) -> None:
        self.answer_now = answer_now


class HttpConfig:
    """What `HttpConnection` reads of uvicorn's config: the app and the keep-alive."""

    def __init__(self, answer_now: Callable[[Exchange], bool]) -> None:
        self.app = _App(answer_now)
        self.timeout_keep_alive = 5


class ServerState:
    """What `HttpConnection` reads of uvicorn's server state."""

    def __init__(self) -> None:
        self.connections: set[Any] = set()
        self.tasks: set[Any] = set()
        self.total_requests = 0
