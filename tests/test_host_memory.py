"""llvm's host memory: one block per executor, carved into page-aligned tensors."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from tapml.errors import ExecutorError
from tapml.runtime.engine import Engine
from tapml.targets.llvm import HostMemory


def address(tensor) -> int:
    return np.from_dlpack(tensor).ctypes.data


def test_tensors_are_page_aligned_disjoint_and_writable():
    sizes = [1, 4096, 10_000, 3]
    memory = HostMemory(sum(HostMemory.rounded(n) for n in sizes))
    tensors = [memory.take(n) for n in sizes]
    spans = sorted((address(t), address(t) + n) for t, n in zip(tensors, sizes, strict=True))
    assert all(start % HostMemory.PAGE == 0 for start, _ in spans)
    assert all(end <= start for (_, end), (start, _) in pairwise(spans))
    for i, (t, n) in enumerate(zip(tensors, sizes, strict=True)):
        assert t.shape == (n,)
        np.from_dlpack(t)[:] = i
    assert [int(np.from_dlpack(t).max()) for t in tensors] == [0, 1, 2, 3]


def test_taking_more_than_the_block_is_refused():
    memory = HostMemory(HostMemory.PAGE)
    memory.take(100)
    with pytest.raises(ExecutorError, match="0 bytes left, not 4096"):
        memory.take(1)


def test_llvm_executor_buffers_lie_in_one_block(tiny_artifact):
    executor = Engine(tiny_artifact()).executor
    plan = executor.plan
    # but the weights, which run in place from their mapped shards (tests/test_lean_runtime.py)
    starts = [address(executor.buffers[name]) for name in plan.owners()
              if plan.buffers[name]["kind"] != "param"]  # fmt: skip
    span = max(starts) - min(starts)
    assert span < sum(HostMemory.rounded(n) for n in plan.allocations())
    assert all(start % HostMemory.PAGE == 0 for start in starts)
