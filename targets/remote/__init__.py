"""Remote devices: the device agent that runs on a device (agent.py, served by server.py),
its wire protocol (wire.py), the clients that drive it or a TVM RPC server (client.py,
tvm_rpc.py), and the device URLs every `--device` option takes (address.py)."""

from .address import DeviceAddress, DeviceURL, parse_url
from .client import (
    DEFAULT_TIMEOUT,
    LOAD_TIMEOUT,
    AgentExecutor,
    connect,
    device_info,
    open_executor,
    start_local_agent,
)  # fmt: skip

__all__ = ["DEFAULT_TIMEOUT", "LOAD_TIMEOUT", "AgentExecutor", "DeviceAddress", "DeviceURL",
           "connect", "device_info", "open_executor", "parse_url", "start_local_agent"]  # fmt: skip
