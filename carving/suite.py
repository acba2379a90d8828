"""The carved-suite format: a manifest of kernel calls and their arrays, content-addressed.

    SUITE/manifest.json         format "tapml-suite", version 1 (see docs/formats.md)
    SUITE/arrays/ab/abcd....z   one array's bytes, zlib-compressed, named by their sha256
    SUITE/scenarios/NAME.json   a carved scenario's calls (resuming skips finished ones)
    SUITE/reports/TARGET/       what `tapml test` wrote

An array is stored once however many calls use it (a layer's weights, a shared input), so
a suite is mostly the activations the calls saw.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tapml.errors import SuiteError
from tapml.fileio import read_document, write_atomic

FORMAT, VERSION = "tapml-suite", 1
MANIFEST = "manifest.json"

# |got - want| <= atol * max|want| + rtol * |want|, elementwise; integers must be equal
TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {"rtol": 1e-3, "atol": 1e-4},
    "float16": {"rtol": 1e-2, "atol": 1e-3},
}
EXACT = {"rtol": 0.0, "atol": 0.0}


def tolerance(dtype: str) -> dict[str, float]:
    return TOLERANCES.get(dtype, EXACT)


class ArrayStore:
    """Arrays on disk under their content hash, written atomically, each once."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.z"

    def put(self, array: np.ndarray) -> str:
        data = np.ascontiguousarray(array).tobytes()
        digest = hashlib.sha256(data).hexdigest()
        path = self.path(digest)
        if not path.is_file():
            write_atomic(path, zlib.compress(data, 1))
        return digest

    def get(self, digest: str, dtype: str, shape: list[int]) -> np.ndarray:
        path = self.path(digest)
        try:
            data = zlib.decompress(path.read_bytes())
        except FileNotFoundError as e:
            raise SuiteError(f"suite array {path} is missing; carve the suite again") from e
        except zlib.error as e:
            raise SuiteError(f"suite array {path} is corrupt ({e}); carve the suite again") from e
        if hashlib.sha256(data).hexdigest() != digest:
            raise SuiteError(f"suite array {path} fails its checksum; carve the suite again")
        count = int(np.prod(shape, dtype=np.int64))
        if len(data) != count * np.dtype(dtype).itemsize:
            raise SuiteError(f"suite array {path} holds {len(data)} bytes, not {dtype}{shape}")
        return np.frombuffer(data, dtype).reshape(shape)

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*.z"))


@dataclass
class Suite:
    """A carved suite: its manifest and the arrays its calls refer to."""

    root: Path
    manifest: dict[str, Any]

    @property
    def arrays(self) -> ArrayStore:
        return ArrayStore(self.root / "arrays")

    @property
    def calls(self) -> list[dict[str, Any]]:
        return self.manifest["calls"]

    def kernels(self) -> list[str]:
        return list(dict.fromkeys(c["kernel"] for c in self.calls))

    def save(self) -> None:
        write_atomic(self.root / MANIFEST, json.dumps(self.manifest, indent=1).encode())

    @classmethod
    def load(cls, root: Path) -> Suite:
        path = Path(root) / MANIFEST
        interrupted = " (carving was interrupted: run tapml carve again)" if (
            Path(root) / "scenarios").is_dir() else ""  # fmt: skip
        manifest = read_document(path, FORMAT, VERSION, SuiteError, "carve the suite again",
                                 missing=f"{path} not found: {root} is not a carved suite"
                                 f"{interrupted}")  # fmt: skip
        for key in ("model", "source", "quantization", "options", "plan_model", "kernels", "calls"):
            if key not in manifest:
                raise SuiteError(f"{path} has no {key!r}; carve the suite again")
        return cls(Path(root), manifest)
