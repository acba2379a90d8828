"""ONNX graphs as models: a .onnx file imported with the `onnx` package and TVM's Relax ONNX
frontend, its inputs' shapes fixed at compile time (`--input-shape NAME=1,3,640,640`).

Exported graphs often compute shapes at run time (Shape -> Gather -> Concat -> Reshape) in
ways the frontend cannot follow. Fixing the inputs' shapes and then letting onnxruntime's
basic graph optimizations fold every constant subgraph leaves a graph of static shapes with
the same operators, and folds BatchNormalization into the convolutions as well. onnx's own
shape inference only annotates shapes; it would leave the Shape chains in place. onnxruntime
is also the reference the compiled graphs are judged against (tests, `tapml test`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CompileError, TapmlError

log = logging.getLogger("tapml")

Shape = tuple[int, ...]


def is_onnx(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def parse_input_shapes(items: Iterable[str]) -> tuple[tuple[str, Shape], ...]:
    """["x=1,3,48,320", "x=1,3,48,640"] -> (("x", (1, 3, 48, 320)), ("x", (1, 3, 48, 640))),
    in the order given (a name given N times makes N entry points), or a TapmlError naming
    the bad item."""
    parsed = []
    for item in items:
        name, sep, dims = item.partition("=")
        values = dims.replace("x", ",").split(",")
        if not (sep and name.strip() and all(v.strip().isdigit() and int(v) for v in values)):
            raise TapmlError(f"input shape {item!r} is not NAME=D1,D2,... (e.g. x=1,3,640,640)")
        parsed.append((name.strip(), tuple(int(v) for v in values)))
    return tuple(parsed)


def shape_text(shape: Iterable[int]) -> str:
    return "x".join(str(d) for d in shape)


@dataclass(frozen=True)
class OnnxGraph:
    """An ONNX model file: its graph's inputs (declared dims: an int, or a name where the
    dim is dynamic), output names and metadata."""

    path: Path
    inputs: dict[str, list[int | str]]
    outputs: list[str]
    metadata: dict[str, str]

    @classmethod
    def open(cls, path: str | Path) -> OnnxGraph:
        import onnx

        path = Path(path)
        if not path.is_file():
            raise TapmlError(f"ONNX file not found: {path}")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf's DecodeError and friends
            raise TapmlError(f"{path} is not a readable ONNX model ({e})") from None
        initializers = {t.name for t in model.graph.initializer}
        inputs = {
            i.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                     for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input if i.name not in initializers
        }  # fmt: skip
        if not inputs or not model.graph.output:
            raise TapmlError(f"{path} has no graph inputs or outputs")
        return cls(path, inputs, [o.name for o in model.graph.output],
                   {p.key: p.value for p in model.metadata_props})  # fmt: skip

    def entries(self, shapes: Iterable[tuple[str, Shape]]) -> list[dict[str, Shape]]:
        """The input shapes of each entry point: an input given N shapes takes the i-th in
        entry i; one given once, or whose dims are all static and not given, takes that shape
        in every entry."""
        given: dict[str, list[Shape]] = {}
        for name, shape in shapes:
            if name not in self.inputs:
                raise TapmlError(f"{self.path.name} has no input {name!r}; its inputs are "
                                 f"{', '.join(self.inputs)}")  # fmt: skip
            given.setdefault(name, []).append(shape)
        count = max((len(v) for v in given.values()), default=1)
        for name, declared in self.inputs.items():
            if name not in given:
                if not all(isinstance(d, int) and d > 0 for d in declared):
                    raise TapmlError(
                        f"input {name!r} of {self.path.name} has dynamic dims {declared}: fix "
                        f"them with --input-shape {name}=" + ",".join(
                            str(d) if isinstance(d, int) and d > 0 else "N" for d in declared)
                    )  # fmt: skip
                given[name] = [tuple(declared)]
            for shape in given[name]:
                _check_dims(name, declared, shape)
            if len(given[name]) not in (1, count):
                raise TapmlError(f"input {name!r} has {len(given[name])} shapes and another "
                                 f"{count}: give each input 1 or {count}")  # fmt: skip
        return [{name: v[i % len(v)] for name, v in given.items()} for i in range(count)]

    def fixed(self, shapes: Mapping[str, Shape]) -> Any:
        """The model with its inputs' shapes fixed to `shapes` and its constant subgraphs
        folded (onnxruntime's basic optimizations), as an onnx ModelProto."""
        import tempfile

        import onnx
        import onnxruntime as ort

        model = onnx.load(str(self.path))
        check_operators(model.graph, self.path.name)
        for graph_input in model.graph.input:
            if graph_input.name in shapes:
                dims = graph_input.type.tensor_type.shape.dim
                for dim, value in zip(dims, shapes[graph_input.name], strict=True):
                    dim.Clear()
                    dim.dim_value = value
        for output in model.graph.output:  # their declared dims (dynamic) would conflict
            output.type.tensor_type.shape.Clear()
        with tempfile.TemporaryDirectory() as tmp:
            folded = Path(tmp) / "folded.onnx"
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            options.optimized_model_filepath = str(folded)
            options.log_severity_level = 3
            try:
                ort.InferenceSession(model.SerializeToString(), options,
                                     providers=["CPUExecutionProvider"])  # fmt: skip
            except Exception as e:
                raise CompileError(f"{self.path.name} cannot run at input shapes "
                                   f"{shapes_text(shapes)}: {e}") from None  # fmt: skip
            return onnx.load(str(folded))

    def relax_module(self, shapes: Mapping[str, Shape]) -> tuple[Any, dict[str, np.ndarray]]:
        """(Relax module of the graph at `shapes`, its weights by parameter name). The
        parameters of its function "main" are the graph's inputs, in order, then the
        weights."""
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx

        model = self.fixed(shapes)
        try:
            mod = from_onnx(model, keep_params_in_input=True)
        except Exception as e:
            raise CompileError(f"TVM's ONNX frontend cannot import {self.path.name} at "
                               f"{shapes_text(shapes)}: {_first_line(e)}") from None  # fmt: skip
        mod, detached = relax.frontend.detach_params(mod)
        params = detached.get("main", [])  # none for a graph without weights
        names = [p.name for p in mod["main"].params][len(self.inputs) :]
        weights = {name: p.numpy() for name, p in zip(names, params, strict=True)}
        # one-element weights (Clip's bounds) become constants, so that the checks the
        # frontend wraps them in (isnan) fold away before they reach a kernel
        scalars = {name: p for name, p in zip(names, params, strict=True)
                   if weights[name].size == 1}  # fmt: skip
        mod = relax.transform.BindParams("main", scalars)(mod)
        _check_static(mod["main"], self.outputs, self.path.name)
        return mod, {name: w for name, w in weights.items() if name not in scalars}


def check_operators(graph: Any, where: str) -> None:
    """Refuse operators TVM's ONNX frontend does not convert, naming the first node of each."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"Constant", "If"}
    unknown: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in known and (node.domain or "ai.onnx") in ("ai.onnx", ""):
            unknown.setdefault(node.op_type, node.name or "(unnamed)")
        elif node.domain not in ("", "ai.onnx"):
            unknown.setdefault(f"{node.domain}.{node.op_type}", node.name or "(unnamed)")
    if unknown:
        listed = "; ".join(f"{op} (node {node!r})" for op, node in unknown.items())
        raise CompileError(f"{where} uses operators tapml cannot import: {listed}")


def _check_dims(name: str, declared: list[int | str], shape: Shape) -> None:
    if len(shape) != len(declared):
        raise TapmlError(f"input {name!r} has {len(declared)} dims, not {len(shape)} "
                         f"({shape_text(shape)})")  # fmt: skip
    for axis, (want, got) in enumerate(zip(declared, shape, strict=True)):
        if isinstance(want, int) and want > 0 and want != got:
            raise TapmlError(f"input {name!r} has {want} at axis {axis}, not {got}")


def _check_static(func: Any, outputs: list[str], where: str) -> None:
    """Refuse a function whose outputs' shapes are not all numbers (shapes it computes from
    values, not from the fixed inputs, e.g. NonZero's)."""
    from tvm import relax

    ret = func.body.body.ty
    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    for name, ty in zip(outputs, fields, strict=False):
        shape = getattr(ty, "shape", None)
        values = getattr(shape, "values", None)
        if values is None or not all(type(v).__name__ == "IntImm" for v in values):
            raise CompileError(f"{where}: the shape of output {name!r} ({shape}) is not fixed by "
                               "the input shapes; tapml compiles graphs of static shapes only")


def shapes_text(shapes: Mapping[str, Shape]) -> str:
    return ", ".join(f"{n}={shape_text(s)}" for n, s in shapes.items())


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


GRAPH_ARCHITECTURE = "onnx"  # what an artifact's config names as a graph's architecture
