"""The kernels file of a GPU-style target: its kernel records, read without TVM.

The record format is documented in docs/formats.md ("Kernel records") and produced by
targets/gpu.py; executors (wgpu, OpenCL, CUDA, and the JavaScript runtime) only read it.
"""

from __future__ import annotations

import json
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
        document = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise ExecutorError(f"kernels file not found: {path}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExecutorError(f"{path} is corrupt ({e}); compile the model again") from e
    if document.get("format") != FORMAT or document.get("version") != VERSION:
        raise ExecutorError(f"{path} is not a tapml kernels file of version {VERSION}")
    return document["kernels"]
