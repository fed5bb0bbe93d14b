"""The gRPC server: a listening socket (TLS where asked) whose connections speak `http2` and
route their calls through one `GrpcCalls`."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import tempfile
from typing import Any

from google.protobuf import message_factory

from opserve.frontends.grpc.calls import GrpcCalls, Method
from opserve.frontends.grpc.http2 import Http2Connection, KeepaliveSettings
from opserve.frontends.limits import ConnectionLimits

log = logging.getLogger(__name__)


def methods_of(servicer: Any, service: Any) -> dict[str, Method]:
    """The servicer's handlers by `:path`, for a protobuf service descriptor."""
    methods = {}
    for method in service.methods:
        methods[f"/{service.full_name}/{method.name}"] = Method(
            method.name,
            message_factory.GetMessageClass(method.input_type),
            getattr(servicer, method.name),
            method.client_streaming or method.server_streaming,
            getattr(servicer, f"{method.name}Now", None),
        )
    return methods


def tls_context(key: bytes, certificate: bytes, root: bytes | None) -> ssl.SSLContext:
    """TLS for gRPC: HTTP/2 by ALPN; client certificates checked against `root` when given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory() as folder:  # the ssl module loads keys from files only
        key_path, certificate_path = os.path.join(folder, "key"), os.path.join(folder, "cert")
        with open(os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as file:
            file.write(key)
        with open(certificate_path, "wb") as file:
            file.write(certificate)
        context.load_cert_chain(certificate_path, key_path)
    if root is not None:
        context.load_verify_locations(cadata=root.decode())
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    return context


class GrpcServer:
    """Serves `calls` on one address; `stop` says GOAWAY and waits for calls to finish."""

    def __init__(
        self, calls: GrpcCalls, keepalive: KeepaliveSettings, limits: ConnectionLimits | None = None
    ) -> None:
        self.calls = calls
        self.keepalive = keepalive
        self.limits = limits or ConnectionLimits()
        self.connections: set[Http2Connection] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    def _connection(self) -> Http2Connection:
        """A connection for an accepted socket; past the connection limit, one that says
        GOAWAY (ENHANCE_YOUR_CALM) at once and closes, so the server keeps accepting."""
        limits = self.limits
        if len(self.connections) >= limits.max_connections:
            return Http2Connection(
                self.calls, self.keepalive, refuse="too many connections; try again later"
            )
        connection = Http2Connection(
            self.calls, self.keepalive, self.connections.discard, limits.first_request_timeout_s
        )
        self.connections.add(connection)
        return connection

    async def start(
        self, address: str, port: int, tls: ssl.SSLContext | None = None, reuse_port: bool = False
    ) -> int:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((address, port))
        self.server = await asyncio.get_running_loop().create_server(
            self._connection, sock=sock, ssl=tls, backlog=1024
        )
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        if self.server is None:
            return
        self.server.close()
        for connection in list(self.connections):
            connection.shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (grace if grace is not None else 0)
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.close()
        for call in list(self.calls.calls):
            if call.task is not None:
                call.task.cancel()
        await self.server.wait_closed()
