"""An honest bug planted in a webgpu artifact's kernel, for the tests that must find it."""

from __future__ import annotations

import json
from pathlib import Path


def shift_position(artifact: Path, kernel: str) -> None:
    """Make `kernel` of the artifact's kernels_webgpu.json read one place off: its first
    dispatch's first scalar argument (RoPE's offset into the angle tables, derived from the
    position) one larger."""
    path = artifact / "kernels_webgpu.json"
    document = json.loads(path.read_text())
    args = document["kernels"][kernel]["dispatches"][0]["args"]
    pod = next(a for a in args if "pod" in a)
    assert '"var"' in json.dumps(pod["expr"]), f"{kernel}: its first scalar argument is constant"
    pod["expr"] = {"op": "add", "args": [pod["expr"], 1]}
    path.write_text(json.dumps(document))
