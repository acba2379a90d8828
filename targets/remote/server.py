"""The device agent's listening server: one thread per client, each opening with the handshake
(one line, one deadline, the token checked in constant time), then serving the client's rpyc
session until it leaves or stays silent past the agent's idle timeout."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
import socketserver
import time
from collections.abc import Callable

from . import wire
from .agent import Agent, DeviceService

log = logging.getLogger("tapml")

HANDSHAKE_TIMEOUT = 10.0  # for the client's whole handshake line


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(agent: Agent, host: str, port: int, ready: Callable[[str, int], None] | None = None
          ) -> None:  # fmt: skip
    """Serve clients until interrupted; `ready(host, port)` is called once listening. On any
    exit the agent's files go."""
    try:
        with make_server(agent, host, port) as server:
            if ready is not None:
                ready(*server.server_address[:2])
            server.serve_forever()
    finally:
        agent.close()


def make_server(agent: Agent, host: str, port: int) -> socketserver.ThreadingTCPServer:
    """A listening server whose threads each serve one client (handshake, then rpyc)."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock, peer = self.request, "{}:{}".format(*self.client_address[:2])
            try:
                line = wire.read_line(sock, time.monotonic() + HANDSHAKE_TIMEOUT)
                refusal = check_hello(line, agent.token)
            except (OSError, ValueError, ConnectionError) as e:
                log.info("%s: handshake failed (%s)", peer, e)
                return
            if refusal:
                log.warning("%s refused: %s", peer, refusal)
                sock.sendall(f"refused {refusal}\n".encode())
                return
            sock.sendall(f"ok {wire.VERSION} {agent.backend}\n".encode())
            sock.settimeout(None)
            log.info("%s connected", peer)
            serve_session(agent, sock, peer)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    return Server((host, port), Handler)


def serve_session(agent: Agent, sock: socket.socket, peer: str) -> None:
    """Serve one client's requests until it leaves, breaks the protocol or stays silent for
    the agent's idle timeout."""
    import rpyc

    conn = rpyc.connect_channel(wire.bounded_channel(sock),
                                service=DeviceService(agent, peer, sock),
                                config=dict(wire.CONFIG))  # fmt: skip
    why = "left"
    try:
        while not conn.closed:
            if not conn.serve(agent.idle_timeout):
                why = f"idle for {agent.idle_timeout:.0f} s: closed"
                break
    except (EOFError, OSError):
        pass  # the client left, or sent a frame the channel refused
    finally:
        wire.hang_up(conn)
        log.info("%s disconnected (%s)", peer, why)


def check_hello(line: str, token: str | None) -> str | None:
    """Why a client's handshake line is refused, or None."""
    parts = line.split(" ")
    if len(parts) != 3 or parts[0] != wire.MAGIC:
        return "not a tapml device client"
    if parts[1] != str(wire.VERSION):
        return (f"the client speaks protocol {parts[1]}, this agent {wire.VERSION}: use the "
                "same tapml version on both")  # fmt: skip
    try:
        sent = bytes.fromhex(parts[2])
    except ValueError:
        return "a malformed token"
    if token is None:
        return None
    if not sent:
        return "this agent needs a token (--token-file or TAPML_DEVICE_TOKEN on the client)"
    if not hmac.compare_digest(sent, token.encode()):
        return "wrong token"
    return None
