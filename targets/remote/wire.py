"""The device agent's wire protocol, both ends: the handshake, bounded frames, rpyc settings.

A connection opens with one line each way before rpyc starts: the client sends
`tapml-device VERSION TOKEN_HEX\\n` (TOKEN_HEX empty when it has no token), the agent answers
`ok VERSION BACKEND\\n` or `refused REASON\\n` and closes. Then rpyc runs over the same socket
with frames of at most MAX_FRAME bytes, uncompressed, and only brine's plain values
(bytes, str, int, float, bool, None, tuples of them): no pickling, no netrefs to use.
docs/formats.md ("Device agent protocol") documents it.
"""

from __future__ import annotations

import contextlib
import socket
import time

VERSION = 1
MAGIC = "tapml-device"
CHUNK = 4 << 20  # bytes of one upload/download message; bigger buffers go in several
MAX_FRAME = CHUNK + (64 << 10)  # a chunk and its call's other arguments
MAX_LINE = 1024  # the handshake's lines
TOKEN_ENV = "TAPML_DEVICE_TOKEN"
# an agent's defaults, here so that `tapml device serve --help` needs no agent to show them
MAX_UPLOAD_MB = 512  # MiB staged at once by all sessions together (--max-upload-mb)
IDLE_TIMEOUT = 600.0  # a session silent this long is closed (offload runs pause on the host)

# Both ends: no attribute but the agent's exposed_ methods, no pickling, no tracebacks sent.
CONFIG = {
    "allow_safe_attrs": False,
    "allow_public_attrs": False,
    "allow_all_attrs": False,
    "allow_setattr": False,
    "allow_delattr": False,
    "allow_pickle": False,
    "import_custom_exceptions": False,
    "instantiate_custom_exceptions": False,
    "include_local_traceback": False,
    "include_local_version": False,
}


def bounded_channel(sock: socket.socket):
    """An rpyc channel over `sock` that refuses frames over MAX_FRAME and compressed ones
    (a small compressed frame can inflate to any size)."""
    from rpyc.core import Channel, SocketStream

    # rpyc writes a frame in pieces; Nagle would hold the last one for the peer's delayed ACK
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    class BoundedChannel(Channel):
        def recv(self) -> bytes:
            length, compressed = self.FRAME_HEADER.unpack(self.stream.read(self.FRAME_HEADER.size))
            if length > MAX_FRAME or compressed:
                self.close()
                # EOFError: rpyc ends this connection quietly, the agent serves on
                raise EOFError(f"refused a frame of {length} bytes (compressed: {compressed}); "
                               f"the limit is {MAX_FRAME} uncompressed")  # fmt: skip
            return self.stream.read(length + len(self.FLUSHER))[: -len(self.FLUSHER)]

    return BoundedChannel(SocketStream(sock), compress=False)


def read_line(sock: socket.socket, deadline: float) -> str:
    """One handshake line (without its newline), whole by `deadline` (time.monotonic());
    refuses a longer or a later one."""
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the handshake line did not come in time")
        sock.settimeout(left)
        piece = sock.recv(1)  # byte by byte: what follows the line belongs to rpyc
        if not piece:
            raise ConnectionError("the connection closed during the handshake")
        data += piece
        if len(data) > MAX_LINE:
            raise ValueError(f"a handshake line over {MAX_LINE} bytes")
    return data[:-1].decode("utf-8", "replace")


def client_hello(token: str | None) -> bytes:
    return f"{MAGIC} {VERSION} {(token or '').encode().hex()}\n".encode()


def hang_up(conn) -> None:
    """Close an rpyc connection without its goodbye: rpyc's close sends one and waits for the
    answer, a whole timeout when the peer is frozen, busy or gone."""
    with contextlib.suppress(OSError, EOFError):  # EOFError: rpyc closed the stream already
        conn._channel.stream.sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        conn.close()
