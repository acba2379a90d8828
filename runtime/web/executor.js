// executor.js: run a tapml plan's kernels on WebGPU, as targets/webgpu.py does with wgpu.
// Every buffer stays on the GPU; one compute pass per entry point call; only its first output
// (the logits, or the vectors) is read back. Formats: docs/formats.md ("Execution plan",
// "Kernel records").

export const SLOT = 256; // uniform bytes per dispatch: WebGPU's default minUniformBufferOffsetAlignment
const MAX_GROUPS = 65535; // WebGPU's default maxComputeWorkgroupsPerDimension
const ITEM_BYTES = { float32: 4, float16: 2, int32: 4, uint32: 4, int8: 1, uint8: 1 };
const ARRAYS = { float32: Float32Array, int32: Int32Array, uint32: Uint32Array, float16: Uint16Array };
const WGSL_SETTERS = { i32: "setInt32", u32: "setUint32", f32: "setFloat32" };

// WebGPU sizes, binds and copies buffers in whole 4-byte words.
export const words = (n) => Math.max(4, Math.ceil(n / 4) * 4);
export const count = (shape) => shape.reduce((a, b) => a * b, 1);
export const nbytes = (b) => count(b.shape) * ITEM_BYTES[b.dtype];

// The plan's scalar expressions (tapml/plan.py `evaluate`): a number, {var}, or {op, args}.
export function evaluate(expr, env) {
  if (typeof expr === "number") return expr;
  if ("var" in expr) {
    if (!(expr.var in env)) throw new Error(`unbound scalar ${expr.var}`);
    return env[expr.var];
  }
  const a = expr.args.map((x) => evaluate(x, env));
  switch (expr.op) {
    case "add": return a[0] + a[1];
    case "sub": return a[0] - a[1];
    case "mul": return a[0] * a[1];
    case "div": return Number.isInteger(a[0]) && Number.isInteger(a[1]) ? Math.trunc(a[0] / a[1]) : a[0] / a[1];
    case "mod": return Math.trunc(a[0] % a[1]); // JS % truncates toward zero, like C
    case "floordiv": return Math.floor(a[0] / a[1]);
    case "floormod": return a[0] - Math.floor(a[0] / a[1]) * a[1];
    case "min": return Math.min(a[0], a[1]);
    case "max": return Math.max(a[0], a[1]);
    case "eq": return a[0] === a[1];
    case "ne": return a[0] !== a[1];
    case "lt": return a[0] < a[1];
    case "le": return a[0] <= a[1];
    case "gt": return a[0] > a[1];
    case "ge": return a[0] >= a[1];
    case "and": return a[0] && a[1];
    case "or": return a[0] || a[1];
    case "not": return !a[0];
    case "select": return a[0] ? a[1] : a[2];
    case "cast": return expr.dtype.includes("int") ? Math.trunc(Number(a[0])) : Number(a[0]);
    default: throw new Error(`unknown scalar op ${expr.op}`);
  }
}

// A device with exactly the limits and features the bundle's requirements record names, or an
// error naming every one the adapter lacks.
export async function requestDevice(requirements) {
  if (!navigator.gpu) throw new Error("this browser has no WebGPU (navigator.gpu is missing)");
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  if (!adapter) throw new Error("WebGPU is available but offers no adapter");
  const missing = [];
  for (const [name, need] of Object.entries(requirements.limits)) {
    if (!(name in adapter.limits)) missing.push(`limit ${name} (unknown to this browser)`);
    else if (adapter.limits[name] < need) missing.push(`limit ${name}: needs ${need}, the adapter allows ${adapter.limits[name]}`);
  }
  for (const feature of requirements.features)
    if (!adapter.features.has(feature)) missing.push(`feature ${feature}`);
  if (missing.length) throw new Error(`this GPU cannot run the bundle: ${missing.join("; ")}`);
  const device = await adapter.requestDevice({
    requiredLimits: requirements.limits, requiredFeatures: requirements.features });
  return { adapter, device };
}

// A dispatch's own WGSL (the record's source holds every device function of the kernel), the
// setter of each POD field, and 1 where TVM's guard is `> packGridDimX` (then x - 1 is passed).
function wgslInterface(record, dispatch) {
  const parts = record.source.split(/\/\/ Function: (\S+)\n\/\/-+\n/);
  let source = record.source;
  for (let i = 1; i < parts.length; i += 2) if (parts[i] === dispatch.entry && parts[i + 1].trim()) source = parts[i + 1];
  const struct = /struct PODArgs\s*\{([^}]*)\}/.exec(source);
  const fields = struct ? [...struct[1].matchAll(/(\w+)\s*:\s*(\w+)/g)].map((m) => [m[1], m[2]]) : [];
  const pods = dispatch.args.filter((a) => "pod" in a);
  if (fields.length !== pods.length + 1 || fields[fields.length - 1][0] !== "packGridDimX")
    throw new Error(`${dispatch.entry}: PODArgs ${JSON.stringify(fields)} do not match its record`);
  const guard = /(>=?)\s*podArgs\.packGridDimX/.exec(source);
  // int64 PODs are i32 in WGSL: the struct, not the record, says what to write
  return { source, setters: fields.slice(0, -1).map(([, t]) => WGSL_SETTERS[t]),
           guard: guard && guard[1] === ">" ? 1 : 0 };
}

export class PlanExecutor {
  // Allocates every buffer; `await prepare()` then compiles the pipelines.
  constructor(device, plan, kernels) {
    this.device = device;
    this.plan = plan;
    this.kernels = kernels;
    this.pipelines = new Map();
    this.buffers = {}; // name -> {gpu, size}: views and temps bind [0, size) of a shared buffer
    const storages = {};
    for (const [id, size] of Object.entries(plan.storages)) storages[id] = this.alloc(size, id);
    for (const [name, b] of Object.entries(plan.buffers)) {
      if (b.kind === "temp") this.buffers[name] = { gpu: storages[b.storage], size: words(nbytes(b)) };
      else if (b.kind !== "view") this.buffers[name] = { gpu: this.alloc(nbytes(b), name), size: words(nbytes(b)) };
    }
    for (const [name, b] of Object.entries(plan.buffers)) {
      if (b.kind !== "view") continue;
      let root = name;
      while (plan.buffers[root].kind === "view") root = plan.buffers[root].base;
      this.buffers[name] = { gpu: this.buffers[root].gpu, size: words(nbytes(b)) };
    }
    this.programs = {};
  }

  // Compile every kernel's pipelines and bind every dispatch (after `new`, any time before
  // `run`): the plan's kernels must all be in the kernels file.
  async prepare() {
    const plan = this.plan, kernels = this.kernels;
    for (const kernel of new Set(Object.values(plan.functions).flatMap((f) => f.calls.map((c) => c.kernel))))
      if (!(kernel in kernels)) throw new Error(`the kernels file has no kernel ${kernel}; package the model again`);
    this.device.pushErrorScope("validation");
    for (const [name, f] of Object.entries(plan.functions)) this.programs[name] = await this.program(f);
    const error = await this.device.popErrorScope();
    if (error) throw new Error(`WebGPU rejected the plan: ${error.message}`);
  }

  alloc(size, label) {
    const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC;
    return this.device.createBuffer({ size: words(size), usage, label }); // WebGPU zero-fills
  }

  // Upload one parameter's bytes (a view into a weight shard) into its plan buffer.
  upload(name, bytes) {
    const b = this.plan.buffers[name];
    if (!b || b.kind !== "param") throw new Error(`the plan has no parameter ${name}`);
    if (bytes.byteLength !== nbytes(b)) throw new Error(`weight ${name} has ${bytes.byteLength} bytes, the plan expects ${nbytes(b)}`);
    let data = bytes;
    if (data.byteLength % 4) { // writeBuffer copies whole words
      data = new Uint8Array(words(bytes.byteLength));
      data.set(bytes);
    }
    this.device.queue.writeBuffer(this.buffers[name].gpu, 0, data.buffer, data.byteOffset, data.byteLength);
  }

  async pipeline(entry, source, writable) {
    const key = `${entry}\n${source}`; // every dlight kernel is called main_kernel: key by source too
    if (!this.pipelines.has(key)) {
      const d = this.device;
      const entries = writable.map((w, i) => ({ binding: i, visibility: GPUShaderStage.COMPUTE,
                                                 buffer: { type: w ? "storage" : "read-only-storage" } }));
      entries.push({ binding: writable.length, visibility: GPUShaderStage.COMPUTE, buffer: { type: "uniform" } });
      const layout = d.createBindGroupLayout({ entries });
      const module = d.createShaderModule({ code: source, label: entry });
      const pipeline = d.createComputePipelineAsync({
        layout: d.createPipelineLayout({ bindGroupLayouts: [layout] }), compute: { module, entryPoint: entry } })
        .then((p) => ({ pipeline: p, layout }))
        .catch((e) => { throw new Error(`kernel ${entry} does not compile: ${e.message}`); });
      this.pipelines.set(key, pipeline);
    }
    return this.pipelines.get(key);
  }

  // An entry point's dispatches with their pipelines and bind groups (buffers never move), one
  // uniform slot each; its uniform words are filled per run from the scalars.
  async program(f) {
    const steps = [];
    let slot = 0;
    for (const call of f.calls) {
      const record = this.kernels[call.kernel];
      if (call.args.length !== record.params.length)
        throw new Error(`kernel ${call.kernel} takes ${record.params.length} arguments, the plan passes ${call.args.length}`);
      const scalars = record.params.map((p, i) => [p, call.args[i].scalar]).filter(([, s]) => s !== undefined);
      for (const dispatch of record.dispatches) steps.push({ call, record, dispatch, scalars, slot: slot++ });
    }
    const uniform = this.device.createBuffer({ size: Math.max(slot, 1) * SLOT,
                                               usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST });
    await Promise.all(steps.map(async (s) => {
      const { source, setters, guard } = wgslInterface(s.record, s.dispatch);
      const { pipeline, layout } = await this.pipeline(s.dispatch.entry, source, s.dispatch.writable);
      const entries = s.dispatch.args.filter((a) => "buffer" in a).map((a, i) => {
        const b = this.buffers[s.call.args[a.buffer].buffer];
        return { binding: i, resource: { buffer: b.gpu, offset: 0, size: b.size } };
      });
      const size = 16 * (Math.floor(setters.length / 4) + 1); // the PODs and packGridDimX, in 16-byte rows
      entries.push({ binding: entries.length, resource: { buffer: uniform, offset: s.slot * SLOT, size } });
      Object.assign(s, { pipeline, setters, guard, bindGroup: this.device.createBindGroup({ layout, entries }),
                         exprs: s.dispatch.args.filter((a) => "pod" in a).map((a) => a.expr) });
    }));
    const output = this.buffers[f.outputs[0]];
    const readback = this.device.createBuffer({ size: output.size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
    return { steps, uniform, values: new ArrayBuffer(Math.max(slot, 1) * SLOT), readback };
  }

  resetState() {
    const encoder = this.device.createCommandEncoder();
    for (const [name, b] of Object.entries(this.plan.buffers))
      if (b.kind === "state") encoder.clearBuffer(this.buffers[name].gpu);
    this.device.queue.submit([encoder.finish()]);
  }

  // Run entry point `name` with its scalars and inputs ({buffer name: typed array}); returns its
  // first output (the logits, or the vectors) as a typed array.
  async run(name, scalars, inputs) {
    const f = this.plan.functions[name], program = this.programs[name], d = this.device;
    for (const s of f.scalars) if (!(s in scalars)) throw new Error(`${name} needs the scalar ${s}`);
    for (const r of f.requires ?? [])
      if (!evaluate(r, scalars)) throw new Error(`${name}: scalars ${JSON.stringify(scalars)} fail ${JSON.stringify(r)}`);
    for (const [buffer, array] of Object.entries(inputs)) d.queue.writeBuffer(this.buffers[buffer].gpu, 0, array);
    const values = new DataView(program.values);
    const encoder = d.createCommandEncoder();
    const pass = encoder.beginComputePass();
    for (const s of program.steps) {
      const env = {};
      for (const [param, expr] of s.scalars) env[param] = evaluate(expr, scalars);
      const base = s.slot * SLOT;
      s.exprs.forEach((expr, i) => values[s.setters[i]](base + 4 * i, Number(evaluate(expr, env)), true));
      let [x, y, z] = s.dispatch.grid.map((g) => evaluate(g, env));
      if (x === 0 || y === 0) continue;
      if (z !== 1 || y > MAX_GROUPS) throw new Error(`${s.call.kernel}: grid ${[x, y, z]} (blockIdx.z is TVM's)`);
      values.setUint32(base + 4 * s.exprs.length, x - s.guard, true);
      while (x > MAX_GROUPS) { x = Math.ceil(x / 2); z *= 2; } // TVM folds x into z; kernels skip the padding
      pass.setPipeline(s.pipeline);
      pass.setBindGroup(0, s.bindGroup);
      pass.dispatchWorkgroups(x, y, z);
    }
    pass.end();
    const output = this.buffers[f.outputs[0]];
    encoder.copyBufferToBuffer(output.gpu, 0, program.readback, 0, output.size);
    d.queue.writeBuffer(program.uniform, 0, program.values); // queue writes land before the submit
    d.queue.submit([encoder.finish()]);
    await program.readback.mapAsync(GPUMapMode.READ);
    const b = this.plan.buffers[f.outputs[0]];
    const result = new ARRAYS[b.dtype](program.readback.getMappedRange().slice(0), 0, count(b.shape));
    program.readback.unmap();
    return result;
  }
}
