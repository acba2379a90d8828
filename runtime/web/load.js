// load.js: a web bundle opened on a WebGPU device for one task: the plan checked, its buffers
// allocated, the weights uploaded, the kernels compiled and the tokenizer ready. What the
// causal LM engine (engine.js) and the sentence embedder (embedder.js) both start from.
import { Bundle } from "./bundle.js";
import { PlanExecutor, requestDevice } from "./executor.js";
import { TextTokenizer } from "./tokenizer.js";

// The adapter's description as a plain object (GPUAdapterInfo does not serialize).
function adapterInfo(adapter) {
  const info = adapter.info ?? {};
  const { vendor = "", architecture = "", device = "", description = "" } = info;
  return { vendor, architecture, device, description, fallback: Boolean(info.isFallbackAdapter) };
}

// The bundle whose directory is `base`, for a plan of task `kind` (tapml/plan.py: "causal_lm",
// "embedding", "graph"): {bundle, device, adapter, executor, tokenizer, stats}; a graph takes
// tensors and has no tokenizer (null). onProgress(stage, done, total) follows the stages
// "weights" and "kernels".
export async function loadBundle(base, kind, onProgress = () => {}) {
  const start = performance.now();
  const bundle = await Bundle.open(base);
  const plan = await bundle.json("plan.json");
  if (plan.format !== "tapml-plan" || plan.version !== 2) throw new Error("plan.json is not a tapml-plan v2 file");
  if (plan.task.kind !== kind) throw new Error(`this bundle's task is ${plan.task.kind}, not ${kind}`);
  const { adapter, device } = await requestDevice(bundle.manifest.requirements);
  const kernels = await bundle.json(`kernels_${bundle.manifest.target}.json`);
  if (kernels.format !== "tapml-kernels" || kernels.version !== 1)
    throw new Error(`kernels_${bundle.manifest.target}.json is not a tapml-kernels v1 file`);
  const tokenizer = kind === "graph" ? null : await TextTokenizer.load(bundle);
  const executor = new PlanExecutor(device, plan, kernels.kernels);
  const weightsStart = performance.now();
  const weights = await bundle.loadWeights(executor, (done, total) => onProgress("weights", done, total));
  const kernelsStart = performance.now();
  onProgress("kernels", 0, 1);
  await executor.prepare();
  onProgress("kernels", 1, 1);
  const end = performance.now();
  const stats = { load_ms: end - start, weights_ms: kernelsStart - weightsStart, kernels_ms: end - kernelsStart,
                  weight_bytes: weights.bytes, adapter: adapterInfo(adapter) };
  return { bundle, device, adapter, executor, tokenizer, stats };
}
