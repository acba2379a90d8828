// bundle.js: fetch a tapml bundle's files (relative URLs: it runs offline from any static
// server), each checked against the size and sha256 that bundle.json lists for it.

export const FORMAT = "tapml-bundle";
export const VERSION = 2; // tapml/package.py VERSION

const hex = (buffer) => [...new Uint8Array(buffer)].map((b) => b.toString(16).padStart(2, "0")).join("");

async function fetchBytes(url) {
  let response;
  try {
    response = await fetch(url);
  } catch (e) {
    throw new Error(`${url}: ${e.message}`);
  }
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status} ${response.statusText}`);
  return response.arrayBuffer();
}

export class Bundle {
  constructor(base, manifest) {
    this.base = base;
    this.manifest = manifest;
    this.files = new Map(manifest.files.map((f) => [f.path, f]));
  }

  // The bundle at `base` (a URL of its directory, ending in "/"), its manifest checked.
  static async open(base) {
    const manifest = JSON.parse(new TextDecoder().decode(await fetchBytes(new URL("bundle.json", base))));
    if (manifest.format !== FORMAT) throw new Error(`${base}bundle.json is not a tapml bundle manifest`);
    if (manifest.version !== VERSION)
      throw new Error(`bundle.json is of version ${manifest.version}; this runtime reads version ${VERSION}: package the model again`);
    if (manifest.platform !== "webgpu") throw new Error(`this is a ${manifest.platform} bundle, not a webgpu one`);
    return new Bundle(base, manifest);
  }

  // The bytes of `path`, after checking them against the manifest: a truncated or corrupted
  // file is an error that names it.
  async bytes(path) {
    const entry = this.files.get(path);
    if (!entry) throw new Error(`bundle.json does not list ${path}: package the model again`);
    const data = await fetchBytes(new URL(path, this.base));
    if (data.byteLength !== entry.nbytes) {
      const what = data.byteLength < entry.nbytes ? "truncated" : "overwritten";
      throw new Error(`${path} has ${data.byteLength} bytes, bundle.json expects ${entry.nbytes} (${what}); download the bundle again`);
    }
    if (!globalThis.crypto?.subtle)
      throw new Error("crypto.subtle is unavailable, so the weights cannot be checked: serve the bundle from https or localhost");
    const digest = hex(await crypto.subtle.digest("SHA-256", data));
    if (digest !== entry.sha256) throw new Error(`${path} fails its sha256 check (corrupted); download the bundle again`);
    return data;
  }

  async json(path) {
    return JSON.parse(new TextDecoder().decode(await this.bytes(path)));
  }

  // Upload every weight into `executor`, shard by shard; onProgress(doneBytes, totalBytes).
  async loadWeights(executor, onProgress = () => {}) {
    const index = await this.json("weights/index.json");
    if (index.format !== "tapml-weights" || index.version !== 1) throw new Error("weights/index.json is not a tapml-weights v1 index");
    const total = index.shards.reduce((n, s) => n + s.nbytes, 0);
    const loaded = new Set();
    let done = 0;
    for (const [i, shard] of index.shards.entries()) {
      const data = await this.bytes(`weights/${shard.file}`);
      for (const t of index.tensors) {
        if (t.shard !== i) continue;
        if (!(t.name in executor.plan.buffers)) continue; // a tensor this plan does not use
        executor.upload(t.name, new Uint8Array(data, t.offset, t.nbytes));
        loaded.add(t.name);
      }
      done += shard.nbytes;
      onProgress(done, total);
    }
    const missing = Object.entries(executor.plan.buffers).filter(([n, b]) => b.kind === "param" && !loaded.has(n));
    if (missing.length) throw new Error(`the weights lack ${missing.length} parameters the plan needs, e.g. ${missing[0][0]}`);
    await executor.device.queue.onSubmittedWorkDone();
    return { bytes: total, shards: index.shards.length };
  }
}
