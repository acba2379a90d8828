// graph.js: a tapml web bundle of an ONNX graph (tapml/plan.py `TensorGraph`): an image fitted to
// the graph's input as PP-OCR's networks take it (runtime/ocr.py), run on WebGPU, every output
// read back by its ONNX name, as runtime/graph.py does.
import { count } from "./executor.js";
import { loadBundle } from "./load.js";

export class Graph {
  // `loaded`: loadBundle's {bundle, device, adapter, executor, stats} and the bundle's config
  constructor(loaded) {
    Object.assign(this, loaded);
    const task = this.executor.plan.task, buffers = this.executor.plan.buffers;
    this.inputs = task.inputs;
    this.outputs = task.outputs;
    this.entries = Object.values(task).filter((e) => e && typeof e === "object" && !Array.isArray(e));
    for (const e of this.entries)
      for (const [name, buffer] of [...Object.entries(e.inputs), ...Object.entries(e.outputs)])
        if (buffers[buffer].dtype !== "float32") throw new Error(`${name} is ${buffers[buffer].dtype}: the web runtime takes float32 graph tensors only`);
    // the ONNX file's metadata_props; PP-OCR's recognizer lists its characters, one a line
    this.metadata = this.config.model.metadata ?? {};
    const characters = this.metadata.character?.split(/\r?\n/);
    if (characters?.at(-1) === "") characters.pop();
    // CTC's classes: the blank, the characters, then a space
    this.classes = characters ? ["", ...characters, " "] : null;
  }

  // Load the bundle whose directory is `base` (default: the page's own). onProgress(stage, done,
  // total) follows the stages "weights" and "kernels".
  static async load(base = new URL("./", document.baseURI), onProgress = () => {}) {
    const loaded = await loadBundle(base, "graph", onProgress);
    const config = await loaded.bundle.json("tapml-config.json");
    return new Graph({ ...loaded, config });
  }

  // The shape of the image input of `entry` (default: the first entry point): [1, 3, H, W].
  inputShape(entry = this.entries[0]) {
    if (this.inputs.length !== 1) throw new Error(`the graph takes ${this.inputs.join(", ")}; this page feeds one image`);
    const shape = this.executor.plan.buffers[entry.inputs[this.inputs[0]]].shape;
    if (shape.length !== 4 || shape[0] !== 1 || shape[1] !== 3) throw new Error(`the graph takes [${shape}], not one image [1, 3, H, W]`);
    return shape;
  }

  // The image (anything drawImage takes) as the input of `shape`: scaled keeping its aspect to fit
  // [H, W], channels BGR, (x / 255 - 0.5) / 0.5, zero-padded on the right and bottom.
  fit(image, shape) {
    const [, , height, width] = shape;
    const scale = Math.min(height / image.height, width / image.width);
    const w = Math.max(1, Math.min(width, Math.round(image.width * scale)));
    const h = Math.max(1, Math.min(height, Math.round(image.height * scale)));
    const canvas = new OffscreenCanvas(w, h), context = canvas.getContext("2d");
    context.drawImage(image, 0, 0, w, h);
    const rgba = context.getImageData(0, 0, w, h).data;
    const x = new Float32Array(3 * height * width);
    for (let y = 0; y < h; y++)
      for (let i = 0; i < w; i++)
        for (let c = 0; c < 3; c++) // BGR: channel c takes the pixel's component 2 - c
          x[(c * height + y) * width + i] = (rgba[4 * (y * w + i) + 2 - c] / 255 - 0.5) / 0.5;
    return x;
  }

  // Every output of `entry` for the input `x`: {name: {shape, data: Float32Array}}.
  async run(x, entry = this.entries[0]) {
    const ex = this.executor, f = ex.plan.functions[entry.function];
    const first = await ex.run(entry.function, {}, { [entry.inputs[this.inputs[0]]]: x });
    const outputs = {};
    for (const name of this.outputs) {
      const buffer = entry.outputs[name];
      outputs[name] = { shape: ex.plan.buffers[buffer].shape,
                        data: buffer === f.outputs[0] ? first : await this.download(buffer) };
    }
    return outputs;
  }

  // A buffer's float32 values (the executor reads back only an entry point's first output).
  async download(buffer) {
    const { gpu, size } = this.executor.buffers[buffer], d = this.device;
    const readback = d.createBuffer({ size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
    const encoder = d.createCommandEncoder();
    encoder.copyBufferToBuffer(gpu, 0, readback, 0, size);
    d.queue.submit([encoder.finish()]);
    await readback.mapAsync(GPUMapMode.READ);
    const data = new Float32Array(readback.getMappedRange().slice(0), 0, count(this.executor.plan.buffers[buffer].shape));
    readback.destroy();
    return data;
  }

  // What a [1, T, C] output says: the best class per step and, with the characters, the CTC
  // text (repeats merged, blanks dropped), as runtime/ocr.py `ctc_decode` reads it.
  decode({ shape, data }) {
    const [, steps, classes] = shape, best = [];
    for (let t = 0; t < steps; t++) {
      let k = 0;
      for (let c = 1; c < classes; c++) if (data[t * classes + c] > data[t * classes + k]) k = c;
      best.push(k);
    }
    if (!this.classes || this.classes.length !== classes) return { best };
    const text = best.filter((k, t) => k !== 0 && k !== best[t - 1]).map((k) => this.classes[k]).join("");
    return { best, text };
  }

  // The image at `source` (a URL, a Blob or File, or anything drawImage takes) through the first
  // entry point: {input: {name, shape, data}, outputs: {name: {shape, data, best?, text?}}, ms}.
  async runImage(source) {
    const image = await toBitmap(source);
    const shape = this.inputShape();
    const input = { name: this.inputs[0], shape, data: this.fit(image, shape) };
    const start = performance.now();
    const outputs = await this.run(input.data);
    for (const output of Object.values(outputs))
      if (output.shape.length === 3 && output.shape[0] === 1) Object.assign(output, this.decode(output));
    return { input, outputs, ms: performance.now() - start };
  }
}

// An image's pixels as they are stored: no color-space conversion, alpha not premultiplied.
async function toBitmap(source) {
  if (typeof source === "string" || source instanceof URL) {
    const response = await fetch(source);
    if (!response.ok) throw new Error(`${source}: HTTP ${response.status} ${response.statusText}`);
    source = await response.blob();
  }
  try {
    return await createImageBitmap(source, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  } catch (e) {
    throw new Error(`not an image this browser decodes (${e.message})`);
  }
}
