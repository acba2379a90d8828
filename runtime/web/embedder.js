// embedder.js: a tapml web bundle of a sentence encoder: texts to unit vectors through the
// plan's (batch, length) buckets, as runtime/embedder.py does.
import { loadBundle } from "./load.js";

export class Embedder {
  // `loaded`: what loadBundle gives (bundle, device, adapter, executor, tokenizer, stats)
  constructor(loaded) {
    Object.assign(this, loaded);
    // how to drive the plan's entry points: its task (tapml/plan.py `SentenceEmbedding`)
    const task = this.executor.plan.task;
    this.dim = task.dim;
    this.maxLength = task.max_length;
    this.buckets = Object.values(task).filter((e) => typeof e === "object")
      .sort((a, b) => a.length - b.length || a.batch - b.batch); // shortest, then smallest batch
    this.cut = []; // the indices of the texts the last `tokenize` cut to maxLength
  }

  // Load the bundle whose directory is `base` (default: the page's own). onProgress(stage, done,
  // total) follows the stages "weights" and "kernels".
  static async load(base = new URL("./", document.baseURI), onProgress = () => {}) {
    return new Embedder(await loadBundle(base, "embedding", onProgress));
  }

  // Each text's ids ([CLS] ... [SEP] for BERT); one longer than the longest bucket is cut to
  // it, keeping its closing token, and its index noted in `cut`.
  tokenize(texts) {
    this.cut = [];
    return texts.map((text, i) => {
      const ids = this.tokenizer.encode(text);
      if (ids.length <= this.maxLength) return ids;
      console.warn(`text ${i + 1} has ${ids.length} tokens; only its first ${this.maxLength} are embedded`);
      this.cut.push(i);
      return [...ids.slice(0, this.maxLength - 1), ids[ids.length - 1]];
    });
  }

  // The unit-length embedding of each text, a Float32Array of `dim` each.
  async embed(texts) {
    return this.embedIds(this.tokenize(texts));
  }

  // The embedding of each row of ids (each at most the longest bucket): each batch padded to
  // its bucket (ids and mask 0), one entry point call per batch.
  async embedIds(rows) {
    const vectors = new Array(rows.length);
    for (const { bucket, members } of this.batches(rows.map((r) => r.length))) {
      const ids = new Int32Array(bucket.batch * bucket.length), mask = new Int32Array(ids.length);
      members.forEach((row, i) => {
        ids.set(rows[row], i * bucket.length);
        mask.fill(1, i * bucket.length, i * bucket.length + rows[row].length);
      });
      const out = await this.executor.run(bucket.function, {}, { [bucket.tokens]: ids, [bucket.mask]: mask });
      members.forEach((row, i) => { vectors[row] = out.slice(i * this.dim, (i + 1) * this.dim); });
    }
    return vectors;
  }

  // {bucket, members} runs covering rows of these lengths (runtime/embedder.py `batches`): rows
  // grouped by the shortest bucket length that holds them, then cut into that length's largest
  // batches; a last single row takes the length's smallest batch.
  batches(lengths) {
    const fits = [...new Set(this.buckets.map((b) => b.length))];
    const longest = fits[fits.length - 1];
    const byLength = new Map(fits.map((length) => [length, []]));
    lengths.forEach((n, i) => {
      if (!(n > 0 && n <= longest)) throw new Error(`row ${i} has ${n} tokens; the buckets hold 1 to ${longest}`);
      byLength.get(fits.find((length) => length >= n)).push(i);
    });
    const runs = [];
    for (let [length, members] of byLength) {
      const buckets = this.buckets.filter((b) => b.length === length);
      const largest = buckets.reduce((a, b) => (b.batch > a.batch ? b : a));
      while (members.length) {
        const bucket = members.length === 1 ? buckets[0] : largest;
        runs.push({ bucket, members: members.slice(0, bucket.batch) });
        members = members.slice(bucket.batch);
      }
    }
    return runs;
  }

  // `candidates` ranked by cosine similarity to `query`, most similar first: [{index, text,
  // score}], index being the candidate's position in `candidates`.
  async rank(query, candidates) {
    const [q, ...vectors] = await this.embed([query, ...candidates]);
    const ranked = vectors.map((v, index) => ({ index, text: candidates[index], score: cosine(q, v) }));
    return ranked.sort((a, b) => b.score - a.score);
  }
}

export function cosine(a, b) {
  let dot = 0, aa = 0, bb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    aa += a[i] * a[i];
    bb += b[i] * b[i];
  }
  return aa && bb ? dot / Math.sqrt(aa * bb) : 0;
}
