"""The webgpu and vulkan targets: TVM's WGSL kernels dispatched by wgpu, buffers kept on the GPU."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tapml.errors import ExecutorError
from tapml.plan import Plan, evaluate

from .executor import Executor

if TYPE_CHECKING:
    from . import TargetSpec

SLOT = 256  # uniform bytes per dispatch: WebGPU's default minUniformBufferOffsetAlignment
MAX_GROUPS = 65535  # WebGPU's default maxComputeWorkgroupsPerDimension
FUNCTION = re.compile(r"// Function: (\S+)\n//-+\n")
PODS = re.compile(r"struct PODArgs\s*\{([^}]*)\}")
GUARD = re.compile(r"(>=?)\s*podArgs\.packGridDimX")
WGSL_TYPES = {"i32": np.int32, "u32": np.uint32, "f32": np.float32}
ADAPTER_ORDER = {"DiscreteGPU": 0, "IntegratedGPU": 1}  # then CPU rasterizers such as lavapipe
WGPU_BACKENDS = {"vulkan": "Vulkan", "metal": "Metal", "dx12": "D3D12", "gl": "OpenGL"}  # its names


def _words(nbytes: int) -> int:
    """WebGPU sizes, binds and copies buffers in whole 4-byte words."""
    return max(4, (nbytes + 3) // 4 * 4)


@dataclass(frozen=True)
class Buffer:
    """A plan buffer: the GPU buffer holding it (temps and views share one) and its extent."""

    gpu: Any
    nbytes: int  # in whole words
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class Dispatch:
    pipeline: Any
    bind_group: Any  # made once: buffers never move
    slot: int  # index of its first uniform word
    pods: list[tuple[type, Any]]  # (numpy type of the WGSL field, EXPR), in struct order
    grid: list[Any]
    guard: int  # 1 where TVM's guard is `index > packGridDimX`: x - 1 then runs exactly x groups


@dataclass(frozen=True)
class Step:
    """One call: its scalar arguments by parameter name (EXPRs of the run's scalars, or ints)."""

    scalars: list[tuple[str, Any]]
    dispatches: list[Dispatch]


class WebGPUExecutor(Executor):
    """Runs a webgpu or vulkan artifact's kernels with wgpu.

    `kernels` is the kernels file or its records; the adapter is wgpu's default for webgpu,
    Vulkan's for vulkan, or the one of `backend` (a key of WGPU_BACKENDS) when given.
    """

    def __init__(self, plan: Plan, kernels: Path | Mapping[str, dict], spec: TargetSpec,
                 backend: str | None = None):  # fmt: skip
        import wgpu

        from .records import resolve_records

        self._wgpu, self.name = wgpu, spec.name
        self._records, self._path = resolve_records(kernels)
        for kernel in plan.kernels:
            if kernel not in self._records:
                raise ExecutorError(f"{self._path} has no kernel {kernel!r}; compile again")
        self._adapter = _adapter(spec, backend)
        self._device = self._request_device(plan, spec)
        self._queue = self._device.queue
        self._pipelines: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._fence = self._alloc(4)
        super().__init__(plan)
        self._programs = {name: self._program(f) for name, f in plan.functions.items()}
        most = max((len(self._records[k]["dispatches"]) for k in plan.kernels), default=1)
        self._scratch = self._buffer(most * SLOT, "UNIFORM"), np.zeros(most * SLOT // 4, "u4")
        self._single: dict[tuple, tuple[list[Any], Step]] = {}

    def _request_device(self, plan: Plan, spec: TargetSpec) -> Any:
        """A device with exactly the limits the plan needs, or an error naming the one missing."""
        limits = required_limits(plan, self._records, spec)
        adapter, features = self._adapter, []
        for key, need in limits.items():
            if adapter.limits[key] < need:
                raise ExecutorError(
                    f"{describe(adapter)} allows {key} = {adapter.limits[key]}; this {spec.name} "
                    f"model needs {need}. Compile for a target with lower limits (tapml targets)"
                )
        if plan.uses_float16:
            if "shader-f16" not in adapter.features:
                raise ExecutorError(f"{describe(adapter)} has no shader-f16, which float16 models "
                                    "need; compile with --quantization q4f32_1 and --kv-cache "
                                    "float32")  # fmt: skip
            features.append("shader-f16")
        try:
            return adapter.request_device_sync(required_features=features, required_limits=limits)
        except Exception as e:  # wgpu raises RuntimeError with the driver's reason
            raise ExecutorError(f"{describe(adapter)} refused a device: {e}") from e

    def _count(self, calls: list[dict[str, Any]]) -> int:
        return _dispatch_count(self._records, calls)

    # -- buffers -----------------------------------------------------------------------
    def _buffer(self, nbytes: int, *usages: str) -> Any:
        usage = 0
        for name in usages:
            usage |= getattr(self._wgpu.BufferUsage, name)
        usage |= self._wgpu.BufferUsage.COPY_DST
        return self._device.create_buffer(size=_words(nbytes), usage=usage)

    def _alloc(self, nbytes: int) -> Any:
        return self._buffer(nbytes, "STORAGE", "COPY_SRC")

    def _view(self, base: Any, shape: list[int], dtype: str) -> Buffer:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        gpu = base.gpu if isinstance(base, Buffer) else base
        return Buffer(gpu, _words(nbytes), tuple(shape), np.dtype(dtype))

    def _upload(self, buffer: Buffer, array: np.ndarray) -> None:
        data = array.reshape(-1).view(np.uint8)
        if data.size % 4:
            data = np.concatenate([data, np.zeros(-data.size % 4, np.uint8)])
        self._queue.write_buffer(buffer.gpu, 0, data)

    def _download(self, buffer: Buffer) -> np.ndarray:
        return _array(buffer, self._queue.read_buffer(buffer.gpu, 0, buffer.nbytes))

    def _sync(self) -> None:
        # wgpu 0.32's on_submitted_work_done_sync raises (pygfx/wgpu-py#834, a callback
        # signature); a read waits for every earlier submission just as well
        self._queue.read_buffer(self._fence)

    def reset_state(self) -> None:
        encoder = self._device.create_command_encoder()
        for name in self.plan.names("state"):
            encoder.clear_buffer(self.buffers[name].gpu)
        self._queue.submit([encoder.finish()])

    # -- kernels -----------------------------------------------------------------------
    def _pipeline(self, entry: str, source: str, writable: list[int]) -> tuple[Any, Any]:
        key = (entry, source)  # every dlight kernel is called main_kernel: key by source too
        if key not in self._pipelines:
            d, stage = self._device, self._wgpu.ShaderStage.COMPUTE
            types = ["storage" if w else "read-only-storage" for w in writable] + ["uniform"]
            layout = d.create_bind_group_layout(entries=[
                {"binding": i, "visibility": stage, "buffer": {"type": t}}
                for i, t in enumerate(types)])  # fmt: skip
            try:
                pipeline = d.create_compute_pipeline(
                    layout=d.create_pipeline_layout(bind_group_layouts=[layout]),
                    compute={"module": d.create_shader_module(code=source), "entry_point": entry},
                )
            except Exception as e:  # wgpu's validation errors carry the shader diagnostics
                raise ExecutorError(f"{self._path}: {entry} does not compile: {e}") from e
            self._pipelines[key] = (pipeline, layout)
        return self._pipelines[key]

    def _step(self, kernel: str, args: list[Any], uniform: Any, slot: int) -> Step:
        """One call's pipelines and bind groups; args in parameter order, buffers as Buffer."""
        record = self._records[kernel]
        try:
            dispatches = []
            for i, d in enumerate(record["dispatches"], slot):
                source, pods, guard = _interface(record, d)
                buffers = [args[a["buffer"]] for a in d["args"] if "buffer" in a]
                entries = [{"buffer": b.gpu, "size": b.nbytes} for b in buffers]
                size = 16 * (len(pods) // 4 + 1)  # the PODs and packGridDimX, in 16-byte rows
                entries.append({"buffer": uniform, "offset": i * SLOT, "size": size})
                pipeline, layout = self._pipeline(d["entry"], source, d["writable"])
                bind_group = self._device.create_bind_group(layout=layout, entries=[
                    {"binding": b, "resource": r} for b, r in enumerate(entries)])  # fmt: skip
                exprs = [a["expr"] for a in d["args"] if "pod" in a]
                pod_args = list(zip(pods, exprs, strict=True))
                dispatches.append(Dispatch(pipeline, bind_group, i * SLOT // 4, pod_args,
                                           d["grid"], guard))  # fmt: skip
            scalars = [(p, a) for p, a in zip(record["params"], args, strict=True)
                       if not isinstance(a, Buffer)]  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise ExecutorError(f"{self._path}: kernel {kernel!r} has a bad record ({e!r}); "
                                "compile the model again") from e  # fmt: skip
        return Step(scalars, dispatches)

    def _program(self, function: dict[str, Any]) -> tuple[list[Step], Any, np.ndarray, Any]:
        """An entry point's steps, its uniform buffer and words, and its output's readback."""
        steps, slot = [], 0
        total = self._count(function["calls"])
        uniform = self._buffer(total * SLOT, "UNIFORM")
        for call in function["calls"]:
            args = [self.buffers[a["buffer"]] if "buffer" in a else a["scalar"]
                    for a in call["args"]]  # fmt: skip
            steps.append(self._step(call["kernel"], args, uniform, slot))
            slot += len(steps[-1].dispatches)
        readback = self._buffer(self.buffers[function["outputs"][0]].nbytes, "MAP_READ")
        return steps, uniform, np.zeros(max(total, 1) * SLOT // 4, "u4"), readback

    # -- running -----------------------------------------------------------------------
    def run(self, function: str, scalars: Mapping[str, int], inputs: Mapping[str, np.ndarray],
            interrupt: Callable[[], None] | None = None) -> np.ndarray:  # fmt: skip
        """Run one entry point as one compute pass (submitted whole: `interrupt` has no point
        between launches to stop at); returns its first output (the logits)."""
        f = self.begin_run(function, scalars, inputs)
        steps, uniform, values, readback = self._programs[function]
        output = self.buffers[f["outputs"][0]]
        self._submit(steps, scalars, uniform, values, (output, readback))
        readback.map_sync(self._wgpu.MapMode.READ)
        try:
            return _array(output, readback.read_mapped(copy=False))
        finally:
            readback.unmap()

    def _launch(self, kernel: str, args: list[Any]) -> None:
        uniform, values = self._scratch
        pairs = list(zip(self._records[kernel]["params"], args, strict=True))
        scalars = {p: a for p, a in pairs if not isinstance(a, Buffer)}
        key = (kernel, *(id(a) for a in args if isinstance(a, Buffer)))
        if key not in self._single:  # kept with their args, so the ids stay theirs
            template = [{"var": p} if p in scalars else a for p, a in pairs]
            self._single[key] = args, self._step(kernel, template, uniform, 0)
        self._submit([self._single[key][1]], scalars, uniform, values)

    def _submit(self, steps: list[Step], scalars: Mapping[str, int], uniform: Any,
                values: np.ndarray, copy: tuple[Buffer, Any] | None = None) -> None:  # fmt: skip
        encoder = self._device.create_command_encoder()
        compute = encoder.begin_compute_pass()
        for step in steps:
            env = {param: evaluate(expr, scalars) for param, expr in step.scalars}
            for d in step.dispatches:
                for i, (kind, expr) in enumerate(d.pods):
                    values.view(kind)[d.slot + i] = evaluate(expr, env)
                x, y, z = (int(evaluate(g, env)) for g in d.grid)
                if x == 0 or y == 0:
                    continue
                if z != 1 or y > MAX_GROUPS:
                    raise ExecutorError(f"grid {[x, y, z]}: blockIdx.z is TVM's, y over the limit")
                values[d.slot + len(d.pods)] = x - d.guard
                while x > MAX_GROUPS:  # TVM's convention: fold x into z, the kernel skips padding
                    x, z = (x + 1) // 2, z * 2
                compute.set_pipeline(d.pipeline)
                compute.set_bind_group(0, d.bind_group)
                compute.dispatch_workgroups(x, y, z)
        compute.end()
        if copy is not None:
            encoder.copy_buffer_to_buffer(copy[0].gpu, 0, copy[1], 0, copy[0].nbytes)
        # queue writes land before later submissions, so uniforms can follow the encoding
        self._queue.write_buffer(uniform, 0, values)
        self._queue.submit([encoder.finish()])


def required_limits(plan: Plan, records: Mapping[str, dict], spec: TargetSpec) -> dict[str, int]:
    """The WebGPU device limits (wgpu's names) that running `plan` with `records` needs.

    Workgroup limits are the target's own; buffer sizes are what this plan allocates and
    binds, with one uniform slot of SLOT bytes per dispatch. The JavaScript runtime of web
    bundles requests the same (tapml.package writes them into the bundle).
    """
    roots = [n for n, b in plan.buffers.items() if b["kind"] not in ("temp", "view")]
    uniforms = [SLOT * _dispatch_count(records, f["calls"]) for f in plan.functions.values()]
    limits = {
        "max-compute-invocations-per-workgroup": spec.limits.max_invocations,
        "max-compute-workgroup-storage-size": spec.limits.max_workgroup_storage,
        "max-storage-buffers-per-shader-stage": spec.limits.max_storage_buffers,
        # the target allows bindings up to its limit; ask for what this plan binds
        "max-storage-buffer-binding-size": _words(max(map(plan.nbytes, plan.buffers))),
        "max-buffer-size": _words(max([*plan.storages.values(), *map(plan.nbytes, roots),
                                       *uniforms])),
    }  # fmt: skip
    sizes = [d["workgroup"] for k in plan.kernels for d in records[k]["dispatches"]]
    for axis, name in enumerate("xyz"):
        limits[f"max-compute-workgroup-size-{name}"] = max((s[axis] for s in sizes), default=1)
    return limits


def _dispatch_count(records: Mapping[str, dict], calls: list[dict[str, Any]]) -> int:
    return sum(len(records[c["kernel"]]["dispatches"]) for c in calls)


def _interface(record: dict[str, Any], d: dict[str, Any]) -> tuple[str, list[type], int]:
    """A dispatch's WGSL, the numpy types of its POD fields, and its guard's offset (1 for >)."""
    chunks = FUNCTION.split(record["source"])  # one module per device function
    sources = {n: s for n, s in zip(chunks[1::2], chunks[2::2], strict=True) if s.strip()}
    source = sources.get(d["entry"], record["source"])
    fields = re.findall(r"(\w+)\s*:\s*(\w+)", PODS.search(source).group(1))
    if len(fields) != sum("pod" in a for a in d["args"]) + 1 or fields[-1][0] != "packGridDimX":
        raise ValueError(f"PODArgs {fields} do not match the POD args {d['args']}")
    guard = GUARD.search(source)
    # int64 PODs are i32 in WGSL: the struct, not the record, says what to write
    types = [WGSL_TYPES[t] for _, t in fields[:-1]]
    return source, types, int(guard is not None and guard.group(1) == ">")


def _array(buffer: Buffer, data: Any) -> np.ndarray:
    count = int(np.prod(buffer.shape, dtype=np.int64))
    return np.frombuffer(data, buffer.dtype, count).reshape(buffer.shape).copy()


_ADAPTERS: dict[tuple[str, str | None], Any] = {}


def _adapter(spec: TargetSpec, backend: str | None = None) -> Any:
    """wgpu's default adapter for webgpu; the best Vulkan adapter for vulkan; the best adapter
    of `backend` (vulkan, metal, dx12, gl) when given. Found once per process: each search
    probes every backend (and Mesa's EGL complains about a missing display on stderr)."""
    key = (spec.name, backend)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = _find_adapter(spec, backend)
    return _ADAPTERS[key]


def _find_adapter(spec: TargetSpec, backend: str | None) -> Any:
    try:
        import wgpu
    except ImportError as e:
        raise ExecutorError(f"the {spec.name} target runs on wgpu: pip install wgpu") from e
    backend = backend or ("vulkan" if spec.name == "vulkan" else None)
    if backend is not None:
        if backend not in WGPU_BACKENDS:
            raise ExecutorError(f"unknown wgpu backend {backend!r}; choose one of: "
                                f"{', '.join(WGPU_BACKENDS)}")  # fmt: skip
        adapters = [a for a in wgpu.gpu.enumerate_adapters_sync()
                    if a.info["backend_type"] == WGPU_BACKENDS[backend]]  # fmt: skip
        if not adapters:
            hint = " (Mesa's lavapipe: apt install mesa-vulkan-drivers)" * (backend == "vulkan")
            raise ExecutorError(f"wgpu finds no {WGPU_BACKENDS[backend]} adapter; install a "
                                f"{WGPU_BACKENDS[backend]} driver{hint}")  # fmt: skip
        return min(adapters, key=lambda a: ADAPTER_ORDER.get(a.info["adapter_type"], 2))
    try:
        adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    except Exception as e:  # wgpu raises RuntimeError when no backend has an adapter
        raise ExecutorError(f"wgpu finds no WebGPU adapter: {e}") from e
    return adapter


def describe(adapter: Any) -> str:
    info = adapter.info
    return f"{info['device']} on {info['backend_type']} ({info['adapter_type']} adapter)"


def available(spec: TargetSpec) -> tuple[bool, str]:
    """Whether this machine can run the target's kernels, and on which adapter (or why not)."""
    try:
        adapter = _adapter(spec)
    except ExecutorError as e:
        return False, str(e)
    f16 = "shader-f16" in adapter.features
    return True, describe(adapter) + ("" if f16 else "; no shader-f16: use --quantization q4f32_1")


def executor(plan: Plan, kernels: Path | Mapping[str, dict], spec: TargetSpec,
             wgpu_backend: str | None = None, **options: Any) -> WebGPUExecutor:  # fmt: skip
    return WebGPUExecutor(plan, kernels, spec, wgpu_backend)


def device_info(spec: TargetSpec, wgpu_backend: str | None = None, **options: Any
                ) -> dict[str, Any]:  # fmt: skip
    adapter = _adapter(spec, wgpu_backend)
    return {"device": describe(adapter), "limits": dict(adapter.limits),
            "features": sorted(adapter.features)}  # fmt: skip
