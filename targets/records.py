"""The kernels file of a GPU-style target: its kernel records, read without TVM.

The record format is documented in docs/formats.md ("Kernel records") and produced by
targets/gpu.py; executors (wgpu, OpenCL, CUDA, and the JavaScript runtime) only read it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from tapml.errors import ExecutorError
from tapml.fileio import write_atomic

FORMAT, VERSION = "tapml-kernels", 1


def write_records(records: dict[str, dict], target: str, tvm_target: str, path: Path) -> None:
    """The records as the target's kernels file (atomically)."""
    document = {"format": FORMAT, "version": VERSION, "target": target,
                "tvm_target": tvm_target, "kernels": records}  # fmt: skip
    write_atomic(path, json.dumps(document, indent=1).encode())


def load_records(path: Path) -> dict[str, dict]:
    """The kernel records of a GPU target's kernels file, checked."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError as e:
        raise ExecutorError(f"kernels file not found: {path}") from e
    except UnicodeDecodeError as e:
        raise ExecutorError(f"{path} is corrupt ({e}); compile the model again") from e
    return parse_records(text, str(path))


def parse_records(text: str, where: str) -> dict[str, dict]:
    """The kernel records in a kernels file's text (`where` names it in errors), checked."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        raise ExecutorError(f"{where} is corrupt ({e}); compile the model again") from e
    if (
        not isinstance(document, dict)
        or document.get("format") != FORMAT
        or document.get("version") != VERSION
        or not isinstance(document.get("kernels"), dict)
    ):
        raise ExecutorError(f"{where} is not a tapml kernels file of version {VERSION}")
    return document["kernels"]


def resolve_records(kernels: Path | Mapping[str, dict]) -> tuple[dict[str, dict], str]:
    """Records from a kernels file, or already in memory (the device agent's); and the name
    errors give them."""
    if isinstance(kernels, Mapping):
        return dict(kernels), "kernel records"
    return load_records(kernels), str(kernels)
