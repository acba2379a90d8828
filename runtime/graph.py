"""A compiled ONNX graph ready to run: named arrays in, named arrays out."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tapml.plan import TensorGraph

from .engine import open_artifact


class GraphRunner:
    """Runs a compiled graph at one of the input shapes it was compiled for (`shapes`)."""

    def __init__(self, artifact: Path, verify_weights: bool = True, executor: Any = None):
        """`executor`: one that already holds this artifact's kernels and weights."""
        opened = open_artifact(artifact, TensorGraph, verify_weights, executor)
        self.artifact, self.config, self.target = opened.path, opened.config, opened.target
        self.plan, self.executor, self.task = opened.plan, opened.executor, opened.task
        self.inputs, self.outputs = self.task.inputs, self.task.outputs
        # the ONNX file's metadata_props (PP-OCR's recognizer keeps its characters there)
        self.metadata: dict[str, str] = self.config["model"].get("metadata", {})

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The shapes of the first input, one per entry point."""
        return [s[self.inputs[0]] for s in self.task.shapes]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output, by name, for inputs of one compiled set of shapes."""
        function, scalars, arrays = self.task.call(inputs)
        first = self.executor.run(function, scalars, arrays)
        buffers = self.plan.functions[function]["outputs"]
        return {name: first if i == 0 else self.executor.download(buffers[i])
                for i, name in enumerate(self.outputs)}  # fmt: skip

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The first output for the first input (a one-in, one-out graph's whole use)."""
        return self.run({self.inputs[0]: x})[self.outputs[0]]
