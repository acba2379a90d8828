"""Read a Hugging Face checkpoint: model.safetensors with the config.json and tokenizer.json
beside it. Float tensors only (F32, F16); they are re-quantized or kept as floats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelNotFound
from .source import SourceTensor

WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"
STORED_TYPES = ("F32", "F16")  # the safetensors dtypes numpy reads (not BF16)


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a model.safetensors file or a directory holding one."""
    path = Path(path)
    return path.suffix == ".safetensors" or (path / WEIGHTS_FILE).is_file()


class SafetensorsFile:
    """A checkpoint opened lazily: its config.json as `metadata`, its tensors by name."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        path = Path(path)
        self.path = path / WEIGHTS_FILE if path.is_dir() else path
        self.directory = self.path.parent
        for needed in (self.path, self.directory / CONFIG_FILE):
            if not needed.is_file():
                raise ModelNotFound(f"{needed} not found: a Hugging Face checkpoint needs "
                                    f"{WEIGHTS_FILE} and {CONFIG_FILE} side by side")  # fmt: skip
        try:
            self.metadata: dict[str, Any] = json.loads((self.directory / CONFIG_FILE).read_text())
            self._file = safe_open(str(self.path), framework="numpy")
        except Exception as e:  # json and safetensors raise their own error types
            raise ModelNotFound(f"{self.path} is not a readable checkpoint: {e}") from e
        self._names = list(self._file.keys())

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("model_type", "unknown"))

    @property
    def tokenizer_file(self) -> Path:
        return self.directory / TOKENIZER_FILE

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def source(self, name: str) -> SourceTensor:
        if name not in self._names:
            raise ModelNotFound(f"{self.path} has no tensor {name!r}")
        sliced = self._file.get_slice(name)
        dtype, shape = sliced.get_dtype(), tuple(int(d) for d in sliced.get_shape())
        if dtype not in STORED_TYPES:
            raise ModelNotFound(f"{self.path}: tensor {name} is {dtype}; tapml reads "
                                f"{' and '.join(STORED_TYPES)} checkpoints")  # fmt: skip

        def raw() -> np.ndarray:
            return self._file.get_tensor(name).view(np.uint8).reshape(shape[0] if shape else 1, -1)

        return SourceTensor(name, dtype, shape, raw,
                            lambda: self._file.get_tensor(name).astype(np.float32))
