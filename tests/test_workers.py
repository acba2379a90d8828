"""Kernels compile in worker processes, one per core: the same artifact as one process makes,
and a kernel that fails (or a worker that dies) is named."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from conftest import TINY_CHUNK, TINY_CONTEXT

from tapml.compiler import CompileOptions, compile_model
from tapml.errors import CompileError
from tapml.runtime.engine import Engine
from tapml.targets import workers


@pytest.mark.parametrize("target", ["llvm", "webgpu"])
def test_workers_make_what_one_process_makes(tiny_gguf, tmp_path, monkeypatch, target):
    options = CompileOptions.resolve(target, "q4f32_1", TINY_CONTEXT, TINY_CHUNK)
    built = {}
    for n in (1, 2):
        monkeypatch.setattr(workers, "workers", lambda n=n: n)
        built[n] = compile_model(tiny_gguf, tmp_path / f"{n}", options, progress=False)
    if target == "llvm":
        logits = [Engine(built[n]).prefill([1, 2, 3]) for n in (1, 2)]
        np.testing.assert_array_equal(*logits)
    else:
        records = [json.loads((built[n] / "kernels_webgpu.json").read_text()) for n in (1, 2)]
        assert records[0] == records[1]


def square(name: str, x: int) -> int:
    if name == "bad":
        raise ValueError("no such thing")
    if name == "dies":
        os._exit(3)
    return x * x


def test_results_come_back_in_the_kernels_order(monkeypatch):
    monkeypatch.setattr(workers, "workers", lambda: 2)
    kernels = {f"k{i}": i for i in range(9, 0, -1)}
    assert workers.compile_each(square, kernels, desc="squares") == {k: i * i for k, i in
                                                                     kernels.items()}  # fmt: skip


@pytest.mark.parametrize("n", [1, 2])
def test_a_failing_kernel_is_named(monkeypatch, n):
    monkeypatch.setattr(workers, "workers", lambda: n)
    with pytest.raises(CompileError, match="squares: kernel bad failed: ValueError: no such thing"):
        workers.compile_each(square, {"a": 1, "bad": 2, "c": 3}, desc="squares")


@pytest.mark.skipif(sys.platform != "linux", reason="workers are forked on Linux only")
def test_a_worker_that_dies_is_an_error(monkeypatch):
    monkeypatch.setattr(workers, "workers", lambda: 2)
    with pytest.raises(CompileError, match=r"a process compiling kernels died \(squares\)"):
        workers.compile_each(square, {"a": 1, "dies": 2, "c": 3}, desc="squares")


def test_the_number_of_workers_can_be_named(monkeypatch):
    monkeypatch.setenv(workers.WORKERS_ENV, "3")
    assert workers.workers() == 3
    monkeypatch.setenv(workers.WORKERS_ENV, "many")
    with pytest.raises(CompileError, match="TAPML_COMPILE_WORKERS='many': give a whole number"):
        workers.workers()
