"""Read GGUF files: metadata as plain Python values, tensors as stored or as float32."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelNotFound
from .source import SourceTensor


class GGUFFile:
    """A GGUF model file opened lazily (memory-mapped): metadata and tensors by name."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelNotFound(f"GGUF file not found: {self.path}")
        try:
            self._reader = GGUFReader(self.path)
        except Exception as e:  # gguf raises ValueError/struct.error/IndexError on bad files
            raise ModelNotFound(f"{self.path} is not a readable GGUF file: {e}") from e
        self.metadata: dict[str, Any] = {
            key: field.contents()
            for key, field in self._reader.fields.items()
            if not key.startswith("GGUF.")
        }
        self._tensors = {t.name: t for t in self._reader.tensors}

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as float32 in PyTorch layout ([out, in] for matrices)."""
        from gguf.quants import dequantize

        t = self._get(name)
        return np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)

    def stored_type(self, name: str) -> str:
        """The tensor's GGUF type name ("F32", "Q4_1", "Q8_0", ...)."""
        return self._get(name).tensor_type.name

    def source(self, name: str) -> SourceTensor:
        """The tensor as stored (read lazily): its type, shape and raw bytes per row."""
        t = self._get(name)
        shape = tuple(int(d) for d in reversed(t.shape))
        return SourceTensor(
            name, t.tensor_type.name, shape,
            raw=lambda: np.asarray(t.data).view(np.uint8).reshape(shape[0] if shape else 1, -1),
            float32=lambda: self.tensor(name),
        )  # fmt: skip

    def _get(self, name: str):
        if name not in self._tensors:
            raise ModelNotFound(f"{self.path} has no tensor {name!r}")
        return self._tensors[name]

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._tensors:
            yield name, self.tensor(name)
