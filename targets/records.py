"""The kernels file of a GPU-style target: its kernel records, read without TVM.

The record format is documented in docs/formats.md ("Kernel records") and produced by
targets/gpu.py; executors (wgpu, OpenCL, CUDA, and the JavaScript runtime) only read it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from tapml.errors import ExecutorError
from tapml.fileio import parse_document, read_document, write_atomic

FORMAT, VERSION = "tapml-kernels", 1


def write_records(records: dict[str, dict], target: str, tvm_target: str, path: Path) -> None:
    """The records as the target's kernels file (atomically)."""
    document = {"format": FORMAT, "version": VERSION, "target": target,
                "tvm_target": tvm_target, "kernels": records}  # fmt: skip
    write_atomic(path, json.dumps(document, indent=1).encode())


def load_records(path: Path) -> dict[str, dict]:
    """The kernel records of a GPU target's kernels file, checked."""
    document = read_document(path, FORMAT, VERSION, ExecutorError, "compile the model again",
                             missing=f"kernels file not found: {path}")  # fmt: skip
    return _kernels(document, str(path))


def parse_records(text: str, where: str) -> dict[str, dict]:
    """The kernel records in a kernels file's text (`where` names it in errors), checked."""
    document = parse_document(text, where, FORMAT, VERSION, ExecutorError,
                              "compile the model again")  # fmt: skip
    return _kernels(document, where)


def _kernels(document: dict, where: str) -> dict[str, dict]:
    if not isinstance(document.get("kernels"), dict):
        raise ExecutorError(f"{where} has no kernel records; compile the model again")
    return document["kernels"]


def resolve_records(kernels: Path | Mapping[str, dict]) -> tuple[dict[str, dict], str]:
    """Records from a kernels file, or already in memory (the device agent's); and the name
    errors give them."""
    if isinstance(kernels, Mapping):
        return dict(kernels), "kernel records"
    return load_records(kernels), str(kernels)
