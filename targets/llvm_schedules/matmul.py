"""Matmul rules: [weight stages], C[m, n] = sum_k x[m, k] * w[n, k], [elementwise epilogue].

One output row (decode) is a GEMV, many rows (prefill) a GEMM; a GEMV over a quantized
weight gets the packed rule (`packed.py`) first.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.s_tir.schedule import SBlockRV

from .base import (
    GEMM_COLS,
    GEMM_REGISTERS,
    GEMM_ROWS,
    GEMM_UNROLL,
    GEMV_CHAINS,
    PARALLEL_MIN_ELEMENTS,
    Kernel,
    divisor,
    elements,
    extent,
    inline_chain,
    is_elementwise,
    vector_lanes,
    vectorize_inner,
)


@dataclass
class Matmul:
    producers: list[SBlockRV]
    reduction: SBlockRV
    epilogue: list[SBlockRV]
    rows: int  # M
    batch: int  # leading batch axes (attention's [batch, heads]), 0 for a plain matmul


def match_matmul(kernel: Kernel) -> Matmul | None:
    """One static [..., M, N, K] reduction reading x[..., m, k], with only elementwise blocks
    around; leading batch axes (a batched matmul's) index x and the output alike."""
    reductions = [i for i, b in enumerate(kernel.blocks) if "R" in kernel.kinds(b)]
    if len(reductions) != 1:
        return None
    i = reductions[0]
    block = kernel.blocks[i]
    kinds = kernel.kinds(block)
    if not kernel.is_simple(block) or not kinds.endswith("SSR") or set(kinds[:-3]) - {"S"}:
        return None
    others = kernel.blocks[:i] + kernel.blocks[i + 1 :]
    if not all(kernel.is_injective(b) for b in others):
        return None
    stmt = kernel.get(block)
    if len([r for r in stmt.reads if not r.source.same_as(stmt.writes[0].source)]) < 2:
        return None  # a sum of one input's values (a mean), not of products
    extents = [extent(kernel.sch, loop) for loop in kernel.sch.get_loops(block)]
    if None in extents or x_read(kernel, block) is None:
        return None
    batch = len(kinds) - 3
    return Matmul(kernel.blocks[:i], block, kernel.blocks[i + 1 :], extents[batch], batch)


def x_read(kernel: Kernel, block: SBlockRV) -> int | None:
    """Index (in the block's reads) of the activations x[..., m, k] of a matmul block."""
    *batch, m, _, k = (v.var for v in kernel.get(block).iter_vars)
    for i, read in enumerate(kernel.get(block).reads):
        mins = [r.min for r in read.region]
        if len(mins) == len(batch) + 2 and all(
            a.same_as(b) for a, b in zip(mins, [*batch, m, k], strict=True)
        ):
            return i
    return None


def gemv(kernel: Kernel) -> bool:
    """One output row: each task reduces whole rows of the weight, vectorized along K.

    The reduction is split into GEMV_CHAINS independent vector accumulators (rfactor),
    summed at the end of each row; with packed weights a vector covers whole words (see
    `_lanes`).
    """
    match = match_matmul(kernel)
    if match is None or match.rows != 1 or match.batch:
        return False
    sch = kernel.sch
    for block in match.producers:
        sch.compute_inline(block)
    block = match.reduction
    _, n, k = sch.get_loops(block)
    lanes = vector_lanes(kernel, block, kernel.get(block).iter_vars[2].var, extent(sch, k))
    chains = divisor(extent(sch, k) // lanes, GEMV_CHAINS)
    _, k_chain, k_lane = sch.split(k, [None, chains, lanes])
    rf = sch.rfactor(sch.fuse(k_chain, k_lane), factor_axis=0)
    _, n, k_outer, k_inner = sch.get_loops(rf)
    k_chain, k_lane = sch.split(k_inner, [chains, lanes])
    sch.unroll(k_chain)
    sch.vectorize(k_lane)
    # Sum the chains as vectors first: a scalar sum of all chains * lanes is a long
    # dependent chain at the end of every row.
    partial = None
    if chains > 1:
        r_chain, r_lane = sch.split(sch.get_loops(block)[-1], [chains, lanes])
        partial = sch.rfactor(r_lane, factor_axis=0)
        sch.reverse_compute_at(partial, n)
        r_lane, r_chain = sch.get_loops(partial)[-2:]
        sch.reorder(r_chain, r_lane)
        sch.vectorize(r_lane)
    sch.reverse_compute_at(block, n)
    if match.epilogue:
        sch.reverse_compute_at(inline_chain(kernel, match.epilogue), n)
    if extent(sch, n) * extent(sch, k_outer) * lanes >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(n)
    sch.decompose_reduction(rf, k_outer)
    if partial is not None:
        sch.decompose_reduction(partial, r_chain)
    return True



def gemm(kernel: Kernel) -> bool:
    """Many output rows: vectorized along the rows, each weight element read once.

    x is transposed once per call so that a weight element multiplies a contiguous vector
    of rows; weight stages that do work (dequantization) fill a tile per task, vectorized
    along K, while plain casts are read in place. GEMM_UNROLL output columns times up to
    two vectors of rows accumulate in registers over all of K. Rows go in blocks of at most
    GEMM_ROWS, whose transposed x stays in cache while every column tile reads it. A batched
    matmul (attention's scores and weighted values) does the same per batch element; batch
    elements, row blocks and column tiles are the parallel tasks.
    """
    match = match_matmul(kernel)
    if match is None or match.rows == 1:
        return False
    sch = kernel.sch
    block = match.reduction
    staged = []
    for producer in match.producers:
        if is_elementwise(kernel, producer):
            sch.compute_inline(producer)
        else:
            staged.append(producer)
    x_t = sch.cache_read(block, x_read(kernel, block), "global")
    sch.transform_layout(x_t, ("write", 0), lambda *i: (*i[:-2], i[-1], i[-2]))
    _transpose_in_tiles(kernel, x_t)
    acc = sch.cache_write(block, 0, "global")
    sch.transform_layout(block, ("write", 0), lambda *i: (*i[:-2], i[-1], i[-2]))

    *batch, m, n, k = sch.get_loops(block)
    cols = divisor(extent(sch, n), GEMM_COLS)
    unroll = divisor(cols, GEMM_UNROLL)
    n_task, n_group, n_unroll = sch.split(n, [None, cols // unroll, unroll])
    lanes = divisor(match.rows, 2 * kernel.lanes())
    vector = lanes
    if lanes & (lanes - 1):  # LLVM splits a vector of 20 or 25 floats into a mess of shuffles
        vector = min(match.rows & -match.rows, kernel.lanes())  # a power of two, of the rows
        registers = GEMM_REGISTERS * kernel.lanes() // 16
        if vector >= 4:
            lanes = vector * divisor(match.rows // vector, max(1, registers // unroll))
        else:
            vector = lanes
    block_rows = divisor(match.rows // lanes, GEMM_ROWS // lanes) * lanes
    m_block, m_outer, m_inner = sch.split(m, [None, block_rows // lanes, lanes])
    sch.reorder(*batch, m_block, n_task, n_group, m_outer, k, n_unroll, m_inner)
    if vector != lanes:  # a tile's rows as several vectors of a power of two
        m_vectors, m_inner = sch.split(m_inner, [None, vector])
        sch.unroll(m_vectors)
    sch.vectorize(m_inner)
    sch.unroll(n_unroll)
    sch.reverse_compute_at(acc, n_group)
    if match.epilogue:
        last = inline_chain(kernel, match.epilogue)
        sch.reverse_compute_at(last, n_group)
    task = sch.fuse(*batch, m_block, n_task)
    for producer in reversed(staged):  # consumers first
        sch.compute_at(producer, task)
        vectorize_inner(kernel, producer)
    sch.parallel(task)
    sch.decompose_reduction(block, k)
    return True


def _transpose_in_tiles(kernel: Kernel, block: SBlockRV) -> None:
    """x -> x^T a tile at a time (each tile's rows in L1, its columns stored as vectors),
    tiles in parallel: a naive transpose of a large x strides through memory on one thread."""
    sch = kernel.sch
    *batch, m, k = sch.get_loops(block)
    tile = kernel.lanes()
    m_tiles, m_inner = sch.split(m, [None, divisor(extent(sch, m), tile)])
    k_tiles, k_inner = sch.split(k, [None, divisor(extent(sch, k), tile)])
    sch.reorder(*batch, m_tiles, k_tiles, k_inner, m_inner)
    sch.vectorize(m_inner)
    outer = sch.fuse(*batch, m_tiles)
    if elements(kernel, sch.get_loops(block)) >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(outer)
