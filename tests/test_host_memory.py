"""llvm's host memory: one block per executor, carved into page-aligned tensors, in huge
pages where the OS gives them on request."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from tapml.errors import ExecutorError
from tapml.runtime.engine import Engine
from tapml.targets.llvm import HostMemory

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


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


@pytest.mark.skipif(
    not THP.exists() or "[never]" in THP.read_text(),
    reason="this OS gives no transparent huge pages",
)
def test_the_block_is_backed_by_huge_pages():
    memory = HostMemory(8 * HostMemory.HUGE_PAGE)
    tensor = memory.take(8 * HostMemory.HUGE_PAGE)
    np.from_dlpack(tensor)[:] = 1  # pages are given when first touched
    start = address(tensor)
    assert start % HostMemory.HUGE_PAGE == 0
    assert _anon_huge_kb(start) >= 2048


def test_llvm_executor_buffers_lie_in_one_block(tiny_artifact):
    executor = Engine(tiny_artifact()).executor
    plan = executor.plan
    starts = [address(executor.buffers[name]) for name in plan.owners()]
    span = max(starts) - min(starts)
    assert span < sum(HostMemory.rounded(n) for n in plan.allocations())
    assert all(start % HostMemory.PAGE == 0 for start in starts)


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds `address`, in kB."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and ":" not in first:
            low, high = (int(x, 16) for x in first.split("-"))
            inside = low <= address < high
        elif inside and first == "AnonHugePages:":
            return int(line.split()[1])
    return 0
