"""Source tensors: a weight as its file stores it, read lazily."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import WeightsError


@dataclass(frozen=True)
class SourceTensor:
    """A weight as stored: its type (a GGUF type name: "F32", "F16", "BF16", "Q4_1", ...), its
    shape in PyTorch order ([out, in] for matrices), and readers of its stored bytes (`raw`:
    [rows, bytes per row], uint8) and of its values as float32 (`float32`)."""

    name: str
    stored: str
    shape: tuple[int, ...]
    raw: Callable[[], np.ndarray]
    float32: Callable[[], np.ndarray]

    @classmethod
    def stack(cls, name: str, parts: Sequence[SourceTensor]) -> SourceTensor:
        """The parts' rows one after another (a fused projection). Their stored rows stack
        as they are when the parts share a stored type; otherwise only their values do (the
        type reads "mixed")."""
        first = parts[0]
        for part in parts[1:]:
            if part.shape[1:] != first.shape[1:]:
                raise WeightsError(
                    f"cannot stack {part.name} {list(part.shape)} under {first.name} "
                    f"{list(first.shape)} into {name}: rows of different lengths"
                )
        kinds = {p.stored for p in parts}
        stored = first.stored if len(kinds) == 1 else "mixed"

        def raw() -> np.ndarray:
            if len(kinds) > 1:
                raise WeightsError(f"{name}'s parts are stored as {sorted(kinds)}: no one type")
            return np.concatenate([p.raw() for p in parts])

        shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
        return cls(name, stored, shape, raw,
                   lambda: np.concatenate([p.float32() for p in parts]))  # fmt: skip
