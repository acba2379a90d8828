"""Quantization schemes by name: the activations' dtype and the format of every weight matrix.

    gguf      every matrix as the GGUF stores it: its own blocks (Q4_0, Q4_1, Q5_0, Q8_0,
              Q4_K, Q5_K, Q6_K) read losslessly, F16 as halves, F32/BF16 as float32
              (the default for a GGUF model); float32 activations
    q4f32_1   tapml's 4-bit groups of 32 with float32 scales, re-quantized from the weights
    q4f16_1   the same with float16 scales and activations
    q0f32     every weight as float32 (a GGUF's blocks dequantized exactly)
    q0f16     every weight as float16

Norms and other vectors are always kept in the activations' dtype. A scheme resolves to
one format per matrix (`formats`); fused projections (Q, K and V stacked by rows) get one
format per part, so that parts a GGUF stores in different types stay as stored.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import TapmlError
from .formats import FLOAT16, FLOAT32, GroupQ4, WeightFormat
from .gguf_formats import BLOCK_FORMATS

DEFAULT = "gguf"


@dataclass(frozen=True)
class Quantization:
    name: str
    dtype: str  # the activations', and that of norms and other vectors
    matrix: WeightFormat | None  # the format of every matrix; None: each as stored
    description: str

    def format_for(self, stored: str, tensor: str = "a weight") -> WeightFormat:
        """The format a matrix stored as `stored` (a GGUF type name) is kept in."""
        if self.matrix is not None:
            return self.matrix
        if stored in BLOCK_FORMATS:
            return BLOCK_FORMATS[stored]
        if stored in ("F32", "BF16"):
            return FLOAT32  # bfloat16 widens to float32 exactly
        raise TapmlError(
            f"{tensor} is stored as {stored}, which tapml cannot keep as stored (it keeps "
            f"{', '.join(BLOCK_FORMATS)}, F32 and BF16); compile with --quantization q4f32_1 "
            "(re-quantized) or q0f32 (float32)"
        )

    def formats(self, stored: Mapping[str, Sequence[str]]) -> dict[str, tuple[WeightFormat, ...]]:
        """Per matrix (tapml's name, without the plane suffix): the format of each stored part."""
        return {name: tuple(self.format_for(t, name) for t in types)
                for name, types in stored.items()}  # fmt: skip

    @property
    def calibrated(self) -> bool:
        """Whether quantizing needs activation statistics (tapml's own 4-bit groups)."""
        return isinstance(self.matrix, GroupQ4)


QUANTIZATION: dict[str, Quantization] = {
    q.name: q
    for q in [
        Quantization("gguf", "float32", None, "each weight as the GGUF stores it (its blocks)"),
        Quantization("q4f32_1", "float32", GroupQ4("float32"), "4-bit groups, float32 scales"),
        Quantization("q4f16_1", "float16", GroupQ4("float16"), "4-bit groups, float16 scales"),
        Quantization("q0f32", "float32", FLOAT32, "float32 weights"),
        Quantization("q0f16", "float16", FLOAT16, "float16 weights"),
    ]
}

FORMATS: dict[str, WeightFormat] = {
    f.name: f for f in (FLOAT32, FLOAT16, GroupQ4("float32"), GroupQ4("float16"),
                        *BLOCK_FORMATS.values())  # fmt: skip
}


def get_quantization(name: str) -> Quantization:
    if name not in QUANTIZATION:
        raise TapmlError(f"unknown quantization {name!r}; choose one of: {', '.join(QUANTIZATION)}")
    return QUANTIZATION[name]


def get_format(name: str) -> WeightFormat:
    if name not in FORMATS:
        raise TapmlError(f"unknown weight format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


def format_names(formats: Mapping[str, Sequence[WeightFormat]]) -> dict[str, list[str]]:
    """The formats as the plan and the config record them: matrix -> format name per part."""
    return {name: [f.name for f in parts] for name, parts in formats.items()}


def part_prefixes(name: str, formats: Sequence[WeightFormat]) -> list[str]:
    """Where the planes of a matrix's parts live: `{name}.{plane}` for parts stacked into one
    matrix (one format), `{name}.parts.{i}.{plane}` for each part in a format of its own."""
    if len(set(formats)) <= 1:
        return [name]
    return [f"{name}.parts.{i}" for i in range(len(formats))]


def row_pieces(prefix: str, plane: str, pieces: int) -> list[str]:
    """The parameter names of a plane of a weight split into row ranges (`tapml.nn.bindings`),
    piece by piece: `{prefix}.rows.{j}.{plane}`."""
    return [f"{prefix}.rows.{j}.{plane}" for j in range(pieces)]


def split_rows(params: Iterable[tuple[str, np.ndarray]], row_splits: Mapping[str, list[int]]
               ) -> Iterator[tuple[str, np.ndarray]]:  # fmt: skip
    """The parameters with those of each weight in `row_splits` (its name -> row bounds, as
    `tapml.nn.bindings.split_bindings` gives: its planes, and its bias if any, all per row)
    cut into row-range pieces."""
    for name, array in params:
        prefix, _, plane = name.rpartition(".")
        if prefix not in row_splits:
            yield name, array
            continue
        bounds = row_splits[prefix]
        names = row_pieces(prefix, plane, len(bounds) - 1)
        for piece, (lo, hi) in zip(names, itertools.pairwise(bounds), strict=True):
            yield piece, array[lo:hi]


def _plane(params: Mapping[str, np.ndarray], prefix: str, plane: str
           ) -> tuple[np.ndarray, list[str]]:  # fmt: skip
    """A weight's plane, its row-range pieces joined, and the parameter names it came from."""
    name = f"{prefix}.{plane}"
    if name in params:
        return params[name], [name]
    pieces = 0
    while f"{prefix}.rows.{pieces}.{plane}" in params:
        pieces += 1
    if not pieces:
        raise TapmlError(f"the weights have no {name} (nor its row ranges)")
    names = row_pieces(prefix, plane, pieces)
    return np.concatenate([params[n] for n in names]), names


def dequantize_params(params: Mapping[str, np.ndarray], formats: Mapping[str, Sequence[str]]
                      ) -> dict[str, np.ndarray]:  # fmt: skip
    """The float32 weights, under their unquantized names (`{matrix}.weight`), that a model's
    kernels compute with; `formats` as `format_names` records them.

    The independent numpy forward pass runs on these, so it sees exactly the values the
    compiled kernels see (quantization error included).
    """
    out: dict[str, Any] = {}
    taken: set[str] = set()
    for name, parts in formats.items():
        fmts = [get_format(p) for p in parts]
        prefixes = part_prefixes(name, fmts)
        matrices = []
        for prefix, fmt in zip(prefixes, fmts, strict=False):
            planes = {}
            for plane in fmt.plane_names():
                planes[plane], names = _plane(params, prefix, plane)
                taken.update(names)
            matrices.append(fmt.dequantize(planes))
        out[f"{name}.weight"] = np.concatenate(matrices) if len(matrices) > 1 else matrices[0]
    for name, value in params.items():
        if name not in taken:
            out[name] = np.asarray(value, dtype=np.float32)
    return out

