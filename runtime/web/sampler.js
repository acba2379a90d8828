// sampler.js: the next token from logits: greedy, or temperature with top-k / top-p and a seeded
// draw (the order of runtime/sampling.py; the random stream is this file's own, so a seed
// reproduces browser runs, not Python ones).

// mulberry32: a small, fast 32-bit generator; plenty for drawing tokens.
export function seededRandom(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function argmax(logits) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  return best;
}

export class Sampler {
  // temperature 0 is greedy; topK 0 keeps all; seed null draws a fresh seed.
  constructor({ temperature = 0, topP = 1, topK = 0, seed = null } = {}) {
    if (!(temperature >= 0)) throw new Error(`temperature must be >= 0, got ${temperature}`);
    if (!(topP > 0 && topP <= 1)) throw new Error(`topP must be in (0, 1], got ${topP}`);
    Object.assign(this, { temperature, topP, topK });
    this.random = seededRandom(seed ?? Math.floor(Math.random() * 2 ** 32));
  }

  sample(logits) {
    if (this.temperature === 0) return argmax(logits);
    const max = logits[argmax(logits)];
    let ids = [];
    for (let i = 0; i < logits.length; i++) if (logits[i] > -Infinity) ids.push(i);
    const p = new Float64Array(logits.length);
    for (const i of ids) p[i] = Math.exp((logits[i] - max) / this.temperature);
    ids.sort((a, b) => p[b] - p[a]);
    if (this.topK > 0) ids = ids.slice(0, this.topK);
    if (this.topP < 1) {
      const total = ids.reduce((s, i) => s + p[i], 0);
      let kept = 0, sum = 0;
      while (kept < ids.length && sum < this.topP * total) sum += p[ids[kept++]];
      ids = ids.slice(0, Math.max(kept, 1));
    }
    let draw = this.random() * ids.reduce((s, i) => s + p[i], 0);
    for (const i of ids) if ((draw -= p[i]) < 0) return i;
    return ids[ids.length - 1];
  }
}
