"""Convolution rules: [pad], O[n, f, y, x] = sum_{c, ry, rx} P[n, c, ...] * W[f, c, ry, rx],
[elementwise epilogue], NCHW as TVM's legalization writes conv2d (grouped and depthwise,
strided, dilated) and conv2d_transpose; the kernels of ONNX graphs such as PP-OCR's CNNs.

`conv2d` keeps a tile of outputs in registers over the whole reduction, vectorized along x
(along y * x for a 1x1 conv, whose rows are contiguous); `conv2d_transpose` rebuilds the
transposed conv without the zeros its legalization convolves, then tiles it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir, te, tirx
from tvm.s_tir.schedule import LoopRV, SBlockRV
from tvm.sym.analyzer import Analyzer

from .base import (
    PARALLEL_MIN_ELEMENTS,
    Kernel,
    coefficient,
    divisor,
    elements,
    extent,
    inline_chain,
    is_elementwise,
    substitute_vars,
    uses,
    vectorize_inner,
)

CONV_ACCUMULATORS = 24  # vector registers of accumulators per tile (of AVX-512's 32)
CONV_MAX_VECTORS = 8  # vectors along x per tile
CONV_MAX_CHANNELS = 12  # output channels per tile
DEPTHWISE_ROWS = 4  # output rows per tile of a depthwise conv
CONV_PARALLEL_MIN_MACS = 1 << 18  # below this, a conv runs on one thread
STAGE_BYTES = 256 << 10  # padded input rows staged by a task: in L2, with room to spare
MIN_TASKS = 8  # parallel tasks wanted of a conv (2-4 threads, evenly loaded)
# TVM puts an array under 1 KiB on the stack, and asks the runtime's workspace pool for a
# larger one: a call per tile, which costs more than the registers it would add
STACK_BYTES = 1024


@dataclass
class Conv:
    producers: list[SBlockRV]  # the padding (and a transposed conv's dilation and flip)
    block: SBlockRV
    epilogue: list[SBlockRV]
    extents: list[int]  # n, f, y, x, c, ry, rx
    data: tirx.Buffer  # the (padded) input the conv reads
    grouped: bool  # the input channel read depends on the output channel (depthwise)
    strides: tuple[int, int]  # of the data read along y and x
    rows_whole: bool  # the data's rows are as long as the output's (a 1x1, stride-1 conv)


def match_conv(kernel: Kernel) -> Conv | None:
    """One static reduction over (n, f, y, x, c, ry, rx) writing O[n, f, y, x] and reading a
    4-D input along x at a constant stride, with only injective blocks around it."""
    reductions = [i for i, b in enumerate(kernel.blocks) if "R" in kernel.kinds(b)]
    if len(reductions) != 1:
        return None
    i = reductions[0]
    block = kernel.blocks[i]
    if kernel.kinds(block) != "SSSSRRR" or not kernel.is_simple(block):
        return None
    others = kernel.blocks[:i] + kernel.blocks[i + 1 :]
    if not all(kernel.is_injective(b) for b in others):
        return None
    extents = [extent(kernel.sch, loop) for loop in kernel.sch.get_loops(block)]
    if None in extents:
        return None
    stmt = kernel.get(block)
    n, f, y, x, c, ry, rx = (v.var for v in stmt.iter_vars)
    (write,) = stmt.writes
    if not all(r.min.same_as(v) for r, v in zip(write.region, [n, f, y, x], strict=True)):
        return None
    data = [r for r in stmt.reads if len(r.region) == 4 and uses(r.region[3].min, x)]
    if len(data) != 1:
        return None
    index = data[0].region
    strides = (coefficient(index[2].min, y), coefficient(index[3].min, x))
    if None in strides or uses(index[3].min, y) or uses(index[2].min, x):
        return None
    buffer = data[0].source
    rows_whole = (extents[5:] == [1, 1] and strides == (1, 1)
                  and [int(d) for d in buffer.shape[2:]] == extents[2:4])  # fmt: skip
    return Conv(kernel.blocks[:i], block, kernel.blocks[i + 1 :], extents, buffer,
                uses(index[1].min, f), strides, rows_whole)  # fmt: skip


def conv2d(kernel: Kernel) -> bool:
    """Output tiles of a few channels x a few vectors along x (x and y fused for a 1x1 conv,
    rows for a depthwise one) accumulate in registers over all input channels and taps; the
    epilogue is applied to each tile as it is stored.

    A padded input is staged a block of rows at a time (a strided conv's rows split into
    their phases, so that the conv reads contiguous vectors): the block's rows, for one
    channel of a depthwise conv or all of them, stay in cache while the block's tiles read
    them. Such blocks (and the channels of a depthwise conv, or of a conv with few rows)
    are the parallel tasks; without padding, each tile is a task.
    """
    match = match_conv(kernel)
    if match is None:
        return False
    sch = kernel.sch
    block = match.block
    n_ext, f_ext, y_ext, x_ext, c_ext, kh, kw = match.extents
    pad = None
    for producer in match.producers:
        if is_elementwise(kernel, producer):
            sch.compute_inline(producer)
        elif kernel.get(producer).writes[0].source.same_as(match.data):
            pad = producer
        else:
            vectorize_inner(kernel, producer)
    # a strided conv's padded rows split into phases (if they split evenly: padding the
    # layout would hide the padding pattern that the staging decomposes)
    stride = match.strides[1]
    if pad is None or int(match.data.shape[3]) % stride:
        stride = 1
    if stride > 1:
        sch.transform_layout(pad, ("write", 0), lambda n, c, h, w: (n, c, h, w % stride,
                                                                     w // stride))  # fmt: skip
    macs = n_ext * f_ext * y_ext * x_ext * c_ext * kh * kw
    broadcast = bool(match.epilogue) and _spatial(kernel, match.epilogue[-1]) != match.extents[:4]
    if broadcast:  # the epilogue's output is larger than the conv's (squeeze-excitation)
        last = inline_chain(kernel, match.epilogue)
        loops = sch.get_loops(last)
        size = elements(kernel, loops)
        outer = sch.fuse(*loops[:-1])
        vectorize_inner(kernel, last)
        if size >= PARALLEL_MIN_ELEMENTS:
            sch.parallel(outer)
    width = x_ext
    flatten = lambda n, f, y, x: (n, f, y * width + x)  # noqa: E731
    if match.rows_whole:  # a pointwise conv over contiguous rows: one long row
        sch.transform_block_layout(
            block, lambda n, f, y, x, c, ry, rx: (n, f, y * width + x, c, ry, rx)
        )
        n, f, x, c, ry, rx = sch.get_loops(block)
        x_ext, y_ext, y = x_ext * y_ext, 1, None
    else:
        n, f, y, x, c, ry, rx = sch.get_loops(block)
    lanes, nv, fb, rows = _tile(kernel, match, f_ext, y_ext, x_ext)
    f_o, f_i = sch.split(f, [None, fb])
    x_o, x_v, x_l = sch.split(x, [None, nv, lanes])
    inner = [f_i, x_v, x_l]
    if y is None:
        outer, serial = [n, x_o, f_o], []
    else:
        y_o, y_i = sch.split(y, [None, rows])
        inner = [f_i, y_i, x_v, x_l]
        if pad is None:  # each tile is a task
            outer = [n, f_o, y_o, x_o] if match.grouped else [n, y_o, x_o, f_o]
            serial = []
        else:
            task_rows, chunks = _task(kernel, match, pad, rows, fb)
            y_task, y_t = sch.split(y_o, [None, task_rows // rows])
            if match.grouped:  # each channel reads its own input plane
                outer, serial = [n, f_o, y_task], [y_t, x_o]
            else:  # every tile of a block of rows reads the same input rows
                f_c, f_o = sch.split(f_o, [chunks, None])
                outer, serial = [n, f_c, y_task], [y_t, x_o, f_o]
    sch.reorder(*outer, *serial, c, ry, rx, *inner)
    tile = (serial or outer)[-1]
    out = sch.cache_write(block, 0, "global")  # the tile's accumulators, in registers
    if match.rows_whole:
        sch.transform_layout(block, ("write", 0), flatten)
    if match.epilogue and not broadcast:
        last = inline_chain(kernel, match.epilogue)
        sch.compute_inline(out)
        out = last
    if match.rows_whole:
        sch.transform_block_layout(out, flatten)
    sch.reverse_compute_at(out, tile)
    vectorize_inner(kernel, out)
    for loop in [ry, rx, *inner[:-1]]:
        sch.unroll(loop)
    if lanes > 1:
        sch.vectorize(x_l)
    if pad is not None:  # before the task's loops are fused: its rows, channels, batch apart
        sch.compute_at(pad, outer[-1])
        _stage_input(kernel, pad, stride)
    task = sch.fuse(*outer)
    if macs >= CONV_PARALLEL_MIN_MACS:
        sch.parallel(task)
    sch.decompose_reduction(block, c)
    return True


def _task(kernel: Kernel, match: Conv, pad: SBlockRV, rows: int, fb: int) -> tuple[int, int]:
    """(output rows, channel chunks) of a task that stages its padded input rows: as many rows
    as fit STAGE_BYTES, and for a conv over all channels, its channels split into chunks
    (each staging the same rows) if there are fewer than MIN_TASKS blocks of rows."""
    n_ext, f_ext, y_ext, _, c_ext, kh, _ = match.extents
    padded = kernel.get(pad).writes[0].source
    row_bytes = (1 if match.grouped else c_ext) * int(padded.shape[-1]) * 4
    if len(padded.shape) == 5:  # split into phases
        row_bytes *= int(padded.shape[-2])
    fit = max(1, (STAGE_BYTES // row_bytes - kh) // match.strides[0] + 1)
    blocks = y_ext // rows
    if not match.grouped:  # enough blocks for the threads, if the rows allow
        fit = min(fit, max(1, y_ext // MIN_TASKS))
    task_rows = rows * divisor(blocks, max(1, fit // rows))
    tasks = n_ext * (y_ext // task_rows) * (f_ext // fb if match.grouped else 1)
    chunks = 1
    if not match.grouped and tasks < MIN_TASKS:
        chunks = divisor(f_ext // fb, -(-MIN_TASKS // tasks))
    return task_rows, chunks


def _spatial(kernel: Kernel, block: SBlockRV) -> list[int | None]:
    return [extent(kernel.sch, loop) for loop in kernel.sch.get_loops(block)]


def _tile(kernel: Kernel, match: Conv, f_ext: int, y_ext: int, x_ext: int
          ) -> tuple[int, int, int, int]:  # fmt: skip
    """(vector lanes, vectors along x, output channels, output rows) of a tile."""
    lanes = kernel.lanes()
    while x_ext % lanes:
        lanes //= 2
    vectors = x_ext // lanes
    # AVX2 has half AVX-512's registers; a tile over 1 KiB would not be on the stack
    registers = min(CONV_ACCUMULATORS * kernel.lanes() // 16, (STACK_BYTES - 1) // (4 * lanes))
    most = max(1, min(CONV_MAX_VECTORS, vectors))
    if match.grouped:  # no input shared between channels: rows share each vector they load
        rows = divisor(y_ext, DEPTHWISE_ROWS)
        return lanes, divisor(vectors, min(most, registers // rows)), 1, rows
    # the most accumulators, then the widest tile: a vector of x is one load, a channel's
    # weight one broadcast, and the broadcasts come from as many weight rows
    best = (0, 0, 1, 1)
    for nv in range(1, most + 1):
        if vectors % nv == 0:
            fb = divisor(f_ext, min(CONV_MAX_CHANNELS, registers // nv))
            best = max(best, (nv * fb, nv, nv, fb))
    return lanes, best[2], best[3], 1


def _stage_input(kernel: Kernel, pad: SBlockRV, stride: int) -> None:
    """A task's padded input rows: a row's zeros, then its values copied in, both vectorized
    (a strided conv's row into its phases, a phase at a time)."""
    sch = kernel.sch
    loops = sch.get_loops(pad)
    fill = sch.decompose_padding(pad, loops[-1])
    for block in (fill, pad):
        inner = sch.get_loops(block)[-1]
        if stride == 1:
            vectorize_inner(kernel, block)
        elif extent(sch, inner) % stride == 0:
            _copy_by_phase(kernel, block, inner, stride)


def _copy_by_phase(kernel: Kernel, pad: SBlockRV, loop: LoopRV, stride: int) -> None:
    """Copy a row into its phases one phase at a time: strided reads, contiguous stores."""
    sch = kernel.sch
    w_o, phase = sch.split(loop, [None, stride])
    sch.reorder(phase, w_o)
    lanes = divisor(extent(sch, w_o), kernel.lanes())
    if lanes > 1:
        sch.vectorize(sch.split(w_o, [None, lanes])[1])


# -- transposed convs ---------------------------------------------------------------------------
@dataclass
class Transposed:
    """A ConvTranspose whose kernel is as large as its stride (no two taps overlap): output
    pixel (h, w) is x[:, (h + p) // s, (w + p) // s] times one tap of the weight."""

    x: tirx.Buffer
    w: tirx.Buffer  # [in channels, out channels, s, s]
    stride: int
    padding: tuple[int, int]  # ConvTranspose's, at the top and the left


def match_transposed(kernel: Kernel, match: Conv) -> Transposed | None:
    """The legalized form: x dilated (s - 1 zeros between pixels), padded, and convolved with
    the weight flipped and its channel axes swapped."""
    if len(match.producers) != 3 or match.grouped:
        return None
    _, _, y_ext, x_ext, _, kh, kw = match.extents
    stmt = kernel.get(match.block)
    if not _multiply_accumulate(stmt):
        return None
    kernel_read = [r.source for r in stmt.reads if not r.source.same_as(match.data)
                   and not r.source.same_as(stmt.writes[0].source)]  # fmt: skip
    pad = _writer(kernel, match.producers, match.data)
    flip = _writer(kernel, match.producers, kernel_read[0]) if len(kernel_read) == 1 else None
    if pad is None or flip is None:
        return None
    pad_stmt = kernel.get(pad)
    dilate = _writer(kernel, match.producers, pad_stmt.reads[0].source)
    if dilate is None or len(pad_stmt.reads) != 1:
        return None
    offsets = _offsets(pad_stmt, pad_stmt.reads[0])
    strides = _dilation(kernel.get(dilate))
    weight = _flipped(kernel.get(flip), kh)
    if offsets is None or strides is None or weight is None or kh != kw:
        return None
    s = strides[0]
    x = kernel.get(dilate).reads[0].source
    padding = (kh - 1 + offsets[0], kw - 1 + offsets[1])  # offsets are -(the pad before)
    if strides != (s, s) or kh != s or y_ext % s or x_ext % s or min(padding) < 0:
        return None
    for extent_out, extent_in, p in ((y_ext, x.shape[2], padding[0]),
                                     (x_ext, x.shape[3], padding[1])):  # fmt: skip
        if (extent_out - 1 + p) // s > int(extent_in) - 1:
            return None
    return Transposed(x, weight, s, padding)


def _multiply_accumulate(stmt) -> bool:
    """out = out + a * b (a sum of products)."""
    value = stmt.body.value
    return isinstance(value, tirx.Add) and isinstance(value.b, tirx.Mul)


def _writer(kernel: Kernel, blocks: list[SBlockRV], buffer) -> SBlockRV | None:
    found = [b for b in blocks if kernel.get(b).writes[0].source.same_as(buffer)]
    return found[0] if len(found) == 1 else None


def _offsets(stmt, read) -> tuple[int, int] | None:
    """(dy, dx) of a read at [n, c, y + dy, x + dx] by a block over (n, c, y, x)."""
    point = [v.var for v in stmt.iter_vars]
    mins = [r.min for r in read.region]
    if len(point) != 4 or len(mins) != 4:
        return None
    if not all(m.same_as(v) for m, v in zip(mins[:2], point[:2], strict=True)):
        return None
    analyzer = Analyzer()
    found = [analyzer.simplify(m - v) for m, v in zip(mins[2:], point[2:], strict=True)]
    if not all(isinstance(d, tirx.IntImm) for d in found):
        return None
    return int(found[0].value), int(found[1].value)


def _dilation(stmt) -> tuple[int, int] | None:
    """(sy, sx) of a dilation block: out[n, c, y, x] = x[n, c, y // sy, x // sx] where y and x
    are multiples of sy and sx, else 0."""
    point = [v.var for v in stmt.iter_vars]
    if len(point) != 4 or len(stmt.reads) != 1:
        return None
    mins = [r.min for r in stmt.reads[0].region]
    if not all(m.same_as(v) for m, v in zip(mins[:2], point[:2], strict=True)):
        return None
    strides = []
    for m, v in zip(mins[2:], point[2:], strict=True):
        if not (isinstance(m, tirx.FloorDiv) and m.a.same_as(v) and isinstance(m.b, tirx.IntImm)):
            return None
        strides.append(int(m.b.value))
    value = stmt.body.value
    if not (isinstance(value, tvm.ir.expr.Call) and value.op.name.endswith("if_then_else")):
        return None
    if not (isinstance(value.args[2], tirx.FloatImm) and value.args[2].value == 0):
        return None
    return strides[0], strides[1]


def _flipped(stmt, k: int) -> tirx.Buffer | None:
    """w of a block k[o, i, y, x] = w[i, o, k - 1 - y, k - 1 - x]."""
    point = [v.var for v in stmt.iter_vars]
    if len(point) != 4 or len(stmt.reads) != 1:
        return None
    if not isinstance(stmt.body.value, tvm.ir.expr.TensorLoad):
        return None
    mins = [r.min for r in stmt.reads[0].region]
    analyzer = Analyzer()
    if not (mins[0].same_as(point[1]) and mins[1].same_as(point[0])):
        return None
    for m, v in zip(mins[2:], point[2:], strict=True):
        if not analyzer.can_prove_equal(m + v, k - 1):
            return None
    return stmt.reads[0].source


def conv2d_transpose(kernel: Kernel) -> bool:
    """A transposed conv whose kernel is its stride, rebuilt without the dilation's zeros:
    out[n, c, h, w] = sum_i x[n, i, (h + p) // s, (w + p) // s] * w[i, c, (h + p) % s, ...].

    A tile holds a few output channels, all s x s output phases, and a few vectors of input
    columns: each input vector, loaded once, meets one weight of every phase and channel.
    """
    match = match_conv(kernel)
    if match is None:
        return False
    found = match_transposed(kernel, match)
    if found is None:
        return False
    if not kernel.one_nest_per_block():
        return False
    name = kernel.get(match.block).name_hint
    epilogue = [kernel.get(b).name_hint for b in match.epilogue]
    n_ext, f_ext, y_ext, x_ext, c_ext, _, _ = match.extents
    kernel.sch = sch = s_tir.Schedule(_with_transposed(kernel, match, found))
    block = sch.get_sblock(name)
    s = found.stride
    n, f, y, x, c = sch.get_loops(block)
    y_o, a = sch.split(y, [None, s])
    x_o, b = sch.split(x, [None, s])
    columns = x_ext // s
    lanes = kernel.lanes()
    while columns % lanes:
        lanes //= 2
    registers = min(CONV_ACCUMULATORS * kernel.lanes() // 16, (STACK_BYTES - 1) // (4 * lanes))
    per_phase = max(1, registers // (s * s))
    nv = divisor(columns // lanes, min(CONV_MAX_VECTORS, per_phase))
    fb = divisor(f_ext, max(1, per_phase // nv))
    f_o, f_i = sch.split(f, [None, fb])
    x_t, x_v, x_l = sch.split(x_o, [None, nv, lanes])
    outer = [n, y_o, x_t, f_o]
    sch.reorder(*outer, c, f_i, a, b, x_v, x_l)
    out = sch.cache_write(block, 0, "global")
    sch.transform_layout(block, ("write", 0), lambda n, c, h, w: (n, c, h // s, h % s, w % s,
                                                                  w // s))  # fmt: skip
    if epilogue:
        last = inline_chain(kernel, [sch.get_sblock(e) for e in epilogue])
        sch.compute_inline(out)
        out = last
    sch.reverse_compute_at(out, f_o)
    vectorize_inner(kernel, out)
    for loop in (f_i, a, b, x_v):
        sch.unroll(loop)
    if lanes > 1:
        sch.vectorize(x_l)
    task = sch.fuse(*outer)
    if n_ext * f_ext * y_ext * x_ext * c_ext >= CONV_PARALLEL_MIN_MACS:
        sch.parallel(task)
    sch.decompose_reduction(block, c)
    return True


def _with_transposed(kernel: Kernel, match: Conv, t: Transposed) -> tirx.PrimFunc:
    """The kernel with its dilation, padding, flip and conv blocks replaced by one block of
    the transposed conv's own formula, writing the conv's result buffer."""
    func = kernel.sch.mod["main"]
    stmt = kernel.get(match.block)
    result = stmt.writes[0].source
    s, (ph, pw) = t.stride, t.padding
    x = te.placeholder([int(d) for d in t.x.shape], t.x.dtype, name="x")
    w = te.placeholder([int(d) for d in t.w.shape], t.w.dtype, name="w")
    i = te.reduce_axis((0, int(t.x.shape[1])), name="i")

    def value(n, c, h, w_):
        product = x[n, i, (h + ph) // s, (w_ + pw) // s] * w[i, c, (h + ph) % s, (w_ + pw) % s]
        return te.sum(product.astype(result.dtype), axis=i)

    conv = te.compute([int(d) for d in result.shape], value, name=stmt.name_hint)
    core = te.create_prim_func([x, w, conv])
    renames = dict(zip(core.params, [t.x, t.w, result], strict=True))
    core_root = substitute_vars(core.body.block, renames)
    root = func.body.block
    nests = list(root.body.seq)
    epilogue = nests[len(match.producers) + 1 :]
    dropped = [kernel.get(b).writes[0].source for b in match.producers]
    allocs = [b for b in root.alloc_buffers if not any(b.same_as(d) for d in dropped)]
    body = tirx.SeqStmt([core_root.body, *epilogue]) if epilogue else core_root.body
    block = s_tir.stmt.SBlock([], [], [], "root", body, alloc_buffers=allocs)
    return func.with_body(s_tir.stmt.SBlockRealize([], True, block))
