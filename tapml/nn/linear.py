"""Matmuls and lookups over weights in any weight format, which the kernels read themselves
(dequantization fused into the matmul and the lookup)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from tapml.formats import WeightFormat

from .base import ACC, cast


def _add_planes(module: nn.Module, fmt: WeightFormat, shape: tuple[int, ...]) -> list[str]:
    """Give `module` one parameter per plane of a weight of `shape` stored in `fmt`."""
    planes = fmt.planes(shape)
    for plane, (plane_shape, dtype) in planes.items():
        setattr(module, plane, nn.Parameter(list(plane_shape), dtype))
    return list(planes)


class Linear(nn.Module):
    """y = x @ W^T (+ b) for a weight W [out, in] stored in a weight format, which the matmul
    kernel reads itself (dequantization fused into the matmul); `bias`, if given, is the
    dtype of a bias vector, added in the same kernel.

    `out_features` may list the rows of several projections of the same input, stacked in
    that order (Q, K and V): in one format they are one matrix and one matmul; in different
    formats (a GGUF may store them so) each part is a Linear of its own (`parts`, see
    `tapml.quantization.part_prefixes`) and their outputs are concatenated (then biased).
    A weight too large for one binding is split the same way into row ranges (`rows`, see
    `tapml.nn.bindings`).
    """

    def __init__(self, in_features: int, out_features: int | Sequence[int],
                 formats: WeightFormat | Sequence[WeightFormat],
                 bias: str | None = None):  # fmt: skip
        outs = [out_features] if isinstance(out_features, int) else list(out_features)
        fmts = [formats] * len(outs) if isinstance(formats, WeightFormat) else list(formats)
        if len(fmts) != len(outs):
            raise ValueError(f"{len(outs)} stacked projections but {len(fmts)} formats")
        self.in_features, self.out_features = in_features, sum(outs)
        self.parts = self.rows = None
        if len(set(fmts)) == 1:
            self.format = fmts[0]
            self._planes = _add_planes(self, self.format, (self.out_features, in_features))
        else:
            self.parts = nn.ModuleList([Linear(in_features, o, f)
                                        for o, f in zip(outs, fmts, strict=True)])  # fmt: skip
        self.bias = nn.Parameter((self.out_features,), bias) if bias else None

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def split_rows(self, bounds: list[int]) -> None:
        """Keep the weight as one Linear per row range [bounds[j], bounds[j + 1]), each with
        its rows of the bias: every parameter of a split layer is cut the same way."""
        bias = self.bias.dtype if self.bias is not None else None
        self.rows = nn.ModuleList([Linear(self.in_features, hi - lo, self.format, bias)
                                   for lo, hi in itertools.pairwise(bounds)])  # fmt: skip
        self.bias = None
        _drop_planes(self)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        pieces = self.parts or self.rows
        if pieces is not None:
            y = op.concat([piece(x) for piece in pieces], dim=1)
        else:
            y = matmul(x, self.format, _planes_of(self))
        return y if self.bias is None else y + self.bias


def _planes_of(module: nn.Module) -> dict[str, nn.Tensor]:
    return {plane: getattr(module, plane) for plane in module._planes}


def _drop_planes(module: nn.Module) -> None:
    for plane in module._planes:
        delattr(module, plane)
    module._planes = []


def matmul(x: nn.Tensor, fmt: WeightFormat, planes: dict[str, nn.Tensor]) -> nn.Tensor:
    """x @ W^T [s, out], W [out, in] read from its planes in `fmt` by the kernel: "matmul"
    for float weights, "dequantize_matmul" for quantized ones."""
    name = "dequantize_matmul" if fmt.quantized else "matmul"

    def compute(x_te: te.Tensor, *plane_tes: te.Tensor):
        weight = fmt.weight(dict(zip(planes, plane_tes, strict=True)))
        rows = int(planes[next(iter(planes))].shape[0])
        w = te.compute((rows, x_te.shape[1]), weight,
                       name="dequantize" if fmt.quantized else "weight")  # fmt: skip
        return _matmul(x_te, w, name)

    return op.tensor_expr_op(compute, name, [x, *planes.values()])


def _matmul(x_te: te.Tensor, w: te.Tensor, name: str) -> te.Tensor:
    """x @ w^T accumulated in float32, for w [N, K] produced by a stage of the same kernel.

    The weight stage (a cast or a dequantization) is a block of its own so that schedules
    can either inline it (one output row) or stage weight tiles for many rows at once.
    """
    k = te.reduce_axis((0, x_te.shape[1]), name="k")
    acc = te.compute(
        (x_te.shape[0], w.shape[0]),
        lambda m, n: te.sum(x_te[m, k].astype(ACC) * w[n, k], axis=k),
        name=name,
    )
    return cast(acc, x_te.dtype)


class Embedding(nn.Module):
    """Token embedding [vocab, dim] in a weight format, read by the lookup kernel itself; with
    tied weights it is also the output layer (`project`). `dtype`: the activations'. A table
    too large for one binding is split into row ranges (`rows`, see `tapml.nn.bindings`): the
    lookup reads each id's row from its range's piece."""

    def __init__(self, vocab_size: int, dim: int, fmt: WeightFormat, dtype: str):
        self.vocab_size, self.dim, self.format, self.dtype = vocab_size, dim, fmt, dtype
        self._planes = _add_planes(self, fmt, (vocab_size, dim))
        self.rows, self.bounds = None, [0, vocab_size]

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.vocab_size, self.dim

    def split_rows(self, bounds: list[int]) -> None:
        """Keep the table as one Embedding per row range [bounds[j], bounds[j + 1])."""
        self.rows = nn.ModuleList([Embedding(hi - lo, self.dim, self.format, self.dtype)
                                   for lo, hi in itertools.pairwise(bounds)])  # fmt: skip
        self.bounds = list(bounds)
        _drop_planes(self)

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        # one kernel for every format, float ones included: Relax's own take warns on every
        # compile that its fast mode trusts the ids (the plan checks their range instead)
        pieces = list(self.rows) if self.rows is not None else [self]
        fmt, dtype, bounds = self.format, self.dtype, self.bounds
        planes = [_planes_of(piece) for piece in pieces]
        flat = [t for p in planes for t in p.values()]

        def compute(ids_te: te.Tensor, *plane_tes: te.Tensor):
            tes = iter(plane_tes)
            weights = [fmt.weight({name: next(tes) for name in p}) for p in planes]

            def value(i, k):
                # the last piece's row unless the id falls in an earlier range
                row = ids_te[i]
                v = weights[-1](row - bounds[-2], k)
                for j in reversed(range(len(weights) - 1)):
                    v = tirx.if_then_else(row < bounds[j + 1], weights[j](row - bounds[j], k), v)
                return v.astype(dtype)

            return te.compute((ids_te.shape[0], self.dim), value, name="dequantize_take")

        return op.tensor_expr_op(compute, "dequantize_take", [ids, *flat])

    def project(self, x: nn.Tensor) -> nn.Tensor:
        """Logits from hidden states, computed in float32."""
        if self.rows is not None:
            logits = op.concat([piece.project(x) for piece in self.rows], dim=1)
        else:
            logits = matmul(x, self.format, _planes_of(self))
        return logits.astype("float32") if logits.dtype != "float32" else logits
