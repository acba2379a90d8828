"""Weights larger than one binding: a target binds each buffer a kernel reads up to a limit
(WebGPU: 128 MiB), so a weight whose largest plane exceeds it is split into row ranges, each
a weight of its own; the layer computes over the pieces and joins their results. Rows are
the first axis of every plane of every format, so a piece holds whole rows of each plane."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from tvm.relax.frontend import nn

from tapml.errors import CompileError

from .linear import Embedding, Linear

ROW_ALIGN = 64  # pieces start at multiples of this many rows where that costs no extra piece


def row_bounds(rows: int, row_bytes: int, limit: int) -> list[int]:
    """[0, ..., rows]: the fewest near-equal row ranges of at most `limit` bytes each."""
    if row_bytes > limit:
        raise CompileError(f"one row of {row_bytes} bytes exceeds the binding limit of {limit}")
    pieces = -(-rows * row_bytes // limit)
    while -(-rows // pieces) * row_bytes > limit:
        pieces += 1
    step = -(-rows // pieces)
    aligned = -(-step // ROW_ALIGN) * ROW_ALIGN
    if aligned * row_bytes <= limit:
        step = aligned
    return [*range(0, rows, step), rows]


def split_bindings(module: nn.Module, limit: int) -> dict[str, list[int]]:
    """Split every weight of `module` whose largest plane exceeds `limit` bytes into row
    ranges (0: never), whatever the model and the tensor; returns the weight's name (its
    planes' prefix) -> its row bounds, which the weights are converted by."""
    splits = {}
    if not limit:
        return splits
    for prefix, layer in list(_layers(module, "")):
        if not getattr(layer, "_planes", None):
            continue
        shape = layer.weight_shape
        sizes = [int(np.prod(s)) * np.dtype(d).itemsize
                 for s, d in layer.format.planes(shape).values()]  # fmt: skip
        if max(sizes) > limit:
            splits[prefix] = row_bounds(shape[0], -(-max(sizes) // shape[0]), limit)
            layer.split_rows(splits[prefix])
    return splits


def _layers(root: nn.Module, prefix: str) -> Iterator[tuple[str, Linear | Embedding]]:
    """(name, layer) of every Linear and Embedding in `root`, parts of fused projections too."""
    items = enumerate(root) if isinstance(root, nn.ModuleList) else vars(root).items()
    for name, item in items:
        if isinstance(item, (Linear, Embedding)):
            yield f"{prefix}{name}", item
        if isinstance(item, (nn.Module, nn.ModuleList)):
            yield from _layers(item, f"{prefix}{name}.")
