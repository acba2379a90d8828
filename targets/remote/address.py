"""Device URLs: what every `--device` option takes.

    tapml://HOST:PORT              a tapml device agent (`tapml device serve`)
    tvm-rpc://HOST:PORT[/KEY]      a TVM RPC server (python -m tvm.exec.rpc_server --host
                                   127.0.0.1: it runs uploaded code; see tvm_rpc.py)
    tvm-tracker://HOST:PORT/KEY    a server of KEY from a TVM RPC tracker
"""

from __future__ import annotations

from dataclasses import dataclass

from tapml.errors import DeviceError

SCHEMES = ("tapml", "tvm-rpc", "tvm-tracker")


@dataclass(frozen=True)
class DeviceAddress:
    """A parsed device URL."""

    scheme: str
    host: str
    port: int
    key: str = ""

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}" + (f"/{self.key}" if self.key else "")


class DeviceURL(str):
    """A device URL that carries the token and process id of an agent this process started."""

    token: str | None = None
    pid: int | None = None

    def __new__(cls, url: str, token: str | None = None, pid: int | None = None) -> DeviceURL:
        self = super().__new__(cls, url)
        self.token, self.pid = token, pid
        return self


def parse_url(url: str) -> DeviceAddress:
    """The scheme, host, port and key of a device URL; a clear error for anything else."""
    scheme, sep, rest = url.partition("://")
    usage = ("tapml://HOST:PORT, tvm-rpc://HOST:PORT[/KEY] or tvm-tracker://HOST:PORT/KEY "
             "(start an agent with: tapml device serve)")  # fmt: skip
    if not sep or scheme not in SCHEMES:
        raise DeviceError(f"{url!r} is not a device URL; use {usage}")
    hostport, _, key = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")  # [::1]:9091
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeviceError(f"{url!r} has no HOST:PORT; use {usage}")
    if scheme == "tapml" and key:
        raise DeviceError(f"{url!r}: a tapml:// URL has no key; use tapml://HOST:PORT")
    if scheme == "tvm-tracker" and not key:
        raise DeviceError(f"{url!r}: a tracker URL names the device key, tvm-tracker://HOST:PORT/KEY")
    return DeviceAddress(scheme, host, int(port), key)
