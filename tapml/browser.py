"""A web bundle in headless Chromium: served on 127.0.0.1, driven over the DevTools protocol.

For tests and benchmarks of the JavaScript runtime (tests/test_browser.py, bench/package.py).
Needs Debian's chromium (scripts/setup.sh installs it) and the `websocket-client` package
(`pip install 'tapml[test]'`). Chromium renders WebGPU with its software adapter
(SwiftShader) where there is no GPU, so speeds here are only regression figures.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from .errors import TapmlError

# --enable-unsafe-webgpu: without it headless Chromium on Linux offers no WebGPU adapter
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu-sandbox", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-unsafe-webgpu", "--window-size=900,900",
]  # fmt: skip
CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


class Browser:
    """A static server for `root` and a headless Chromium tab; use as a context manager."""

    def __init__(self, root: Path, timeout: float = 120):
        self.root, self.timeout = Path(root), timeout
        self.events: list[dict[str, Any]] = []
        self._id = 0

    def __enter__(self) -> Browser:
        try:
            import websocket
        except ImportError as e:
            raise TapmlError("driving Chromium needs websocket-client: "
                             "pip install 'tapml[test]'") from e  # fmt: skip
        chromium = find_chromium()
        if chromium is None:
            raise TapmlError("no Chromium found; install it (apt install chromium, or "
                             "bash scripts/setup.sh)")  # fmt: skip
        handler = functools.partial(_Quiet, directory=str(self.root))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._profile = tempfile.mkdtemp(prefix="tapml-chromium-")
        port = _free_port()
        self._process = subprocess.Popen(
            [chromium, *FLAGS, f"--user-data-dir={self._profile}",
             f"--remote-debugging-port={port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            tabs = self._wait_for_tabs(port)
            page = next(t["webSocketDebuggerUrl"] for t in tabs if t["type"] == "page")
            self._ws = websocket.create_connection(page, timeout=self.timeout,
                                                   suppress_origin=True)  # fmt: skip
            self.call("Runtime.enable")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if getattr(self, "_ws", None) is not None:
            self._ws.close()
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def _wait_for_tabs(self, port: int) -> list[dict]:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2) as r:
                    return json.load(r)
            except OSError as e:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise TapmlError(f"Chromium did not start its DevTools endpoint: {e}") from e
                time.sleep(0.2)

    def call(self, method: str, **params) -> dict[str, Any]:
        """One DevTools command; its result (events that arrive meanwhile are kept)."""
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise TapmlError(f"DevTools {method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def open(self, path: str = "index.html") -> None:
        """Navigate to `path` under the served root; returns once the page has loaded (its
        module scripts have run)."""
        url = self.url + path
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + self.timeout
        loaded = f"location.href === {json.dumps(url)} && document.readyState === 'complete'"
        while not self.evaluate(loaded):
            if time.monotonic() > deadline:
                raise TapmlError(f"{url} did not load in {self.timeout:.0f} s")
            time.sleep(0.1)

    def evaluate(self, expression: str, timeout: float | None = None) -> Any:
        """The value of a JavaScript expression (awaited when it is a promise); a thrown error
        becomes a TapmlError with its message."""
        self._ws.settimeout(timeout or self.timeout)
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True,
                           returnByValue=True)  # fmt: skip
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise TapmlError(f"in the page: {text}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        import base64

        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def console(self) -> list[str]:
        """The page's console messages and uncaught exceptions so far."""
        lines = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled":
                args = " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])
                lines.append(f"console.{p['type']}: {args}")
            elif e.get("method") == "Runtime.exceptionThrown":
                lines.append(f"exception: {p['exceptionDetails'].get('text')}")
        return lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
