// engine.js: a tapml web bundle ready to generate: prefill in fixed chunks (the last one
// padded) and decode one token at a time, as runtime/engine.py does.
import { JsonSchemaConstraint } from "./grammar.js";
import { loadBundle } from "./load.js";
import { Sampler } from "./sampler.js";
import { StreamDecoder } from "./tokenizer.js";

export class Engine {
  // `loaded`: what loadBundle gives (bundle, device, adapter, executor, tokenizer, stats)
  constructor(loaded) {
    Object.assign(this, loaded);
    // how to drive the plan's entry points: its task (tapml/plan.py `CausalLM`)
    this.task = this.executor.plan.task;
    this.chunk = this.task.chunk;
    this.maxContext = this.task.max_context;
    this.pos = 0;
    this.fed = []; // the ids the KV cache holds, in order
    this.finishReason = null; // why the last generation ended: stop, length, grammar or context
  }

  // Load the bundle whose directory is `base` (default: the page's own). onProgress(stage, done,
  // total) follows the stages "weights" and "kernels".
  static async load(base = new URL("./", document.baseURI), onProgress = () => {}) {
    return new Engine(await loadBundle(base, "causal_lm", onProgress));
  }

  reset() {
    this.executor.resetState();
    this.pos = 0;
    this.fed = [];
  }

  // Forget all but the first `n` ids of the KV cache (what follows is written over).
  rewind(n) {
    if (n === 0) return this.reset();
    this.pos = n;
    this.fed.length = n;
  }

  checkRoom(n) {
    if (this.pos + n > this.maxContext)
      throw new Error(`${this.pos + n} tokens do not fit the compiled context of ${this.maxContext}`);
  }

  // Feed `ids` at the current position; the logits after the last one.
  async prefill(ids) {
    if (!ids.length) throw new Error("cannot prefill an empty prompt");
    this.checkRoom(ids.length);
    const p = this.task.prefill;
    let logits;
    for (let start = 0; start < ids.length; start += this.chunk) {
      const part = ids.slice(start, start + this.chunk), tokens = new Int32Array(this.chunk);
      tokens.set(part);
      const scalars = { [p.position]: this.pos, [p.count]: part.length };
      logits = await this.executor.run(p.function, scalars, { [p.tokens]: tokens });
      this.pos += part.length;
      this.fed.push(...part);
    }
    return logits;
  }

  async decode(token) {
    this.checkRoom(1);
    const d = this.task.decode;
    const logits = await this.executor.run(d.function, { [d.position]: this.pos }, { [d.tokens]: Int32Array.of(token) });
    this.pos += 1;
    this.fed.push(token);
    return logits;
  }

  // The ids after `promptIds`. options: maxTokens, temperature, topP, topK, seed, constraint
  // (a JsonSchemaConstraint), onLogits(logits) to see each step's raw logits, reusePrefix to
  // prefill only what follows the longest start of the prompt the KV cache holds (a chat's
  // earlier turns).
  async *generateIds(promptIds, options = {}) {
    const { maxTokens = 64, constraint = null, onLogits = null, reusePrefix = false } = options;
    if (promptIds.length >= this.maxContext)
      throw new Error(`the prompt has ${promptIds.length} tokens; the model was compiled for a context of ${this.maxContext}`);
    const sampler = new Sampler(options);
    const stop = new Set(this.tokenizer.stopIds);
    this.finishReason = null;
    // at least the last prompt id is prefilled: its logits give the first new token
    let keep = 0;
    if (reusePrefix) while (keep < promptIds.length - 1 && this.fed[keep] === promptIds[keep]) keep++;
    this.rewind(keep);
    const stats = this.stats;
    let t = performance.now();
    let logits = await this.prefill(promptIds.slice(keep));
    Object.assign(stats, { prompt_tokens: promptIds.length - keep, cached_tokens: keep, prefill_ms: performance.now() - t,
                           decode_tokens: 0, decode_ms: 0 });
    for (let i = 0; i < maxTokens; i++) {
      if (onLogits) onLogits(logits);
      if (constraint) logits = await constraint.mask(logits);
      const token = sampler.sample(logits);
      if (stop.has(token)) { this.finishReason = "stop"; return; }
      if (constraint) constraint.accept(token);
      yield token;
      if (constraint && (await constraint.isComplete())) { this.finishReason = "grammar"; return; }
      if (i + 1 === maxTokens) break;
      if (this.pos >= this.maxContext) { this.finishReason = "context"; return; }
      t = performance.now();
      logits = await this.decode(token);
      stats.decode_ms += performance.now() - t;
      stats.decode_tokens += 1;
    }
    this.finishReason = "length";
  }

  // Stream the completion as text pieces. prompt: a string, or with options.chat the user's
  // message (options.system: a system message; options.messages: a whole conversation).
  // options.jsonSchema constrains the output to JSON matching that schema.
  async *generate(prompt, options = {}) {
    let text = prompt;
    if (options.chat || options.messages) {
      const messages = options.messages ?? [
        ...(options.system ? [{ role: "system", content: options.system }] : []), { role: "user", content: prompt }];
      text = this.tokenizer.chatPrompt(messages);
    }
    const constraint = options.jsonSchema ? await JsonSchemaConstraint.create(this.tokenizer, options.jsonSchema) : null;
    const stream = new StreamDecoder(this.tokenizer);
    let output = "";
    try {
      for await (const token of this.generateIds(this.tokenizer.encode(text), { ...options, constraint })) {
        const piece = stream.add(token);
        output += piece;
        if (piece) yield piece;
      }
      const tail = stream.flush();
      output += tail;
      if (tail) yield tail;
      if (constraint && !["stop", "grammar"].includes(this.finishReason))
        throw new Error(`the JSON output is incomplete: ${this.finishReason === "length" ? "maxTokens" : "the context"} ran out`);
      if (constraint) JSON.parse(output); // the grammar's promise, checked
    } finally {
      if (constraint) constraint.dispose();
    }
  }

  // Greedy ids and the logits before each (for tests): prefill then `steps` - 1 decodes.
  async trace(promptIds, steps) {
    const logits = [], tokens = [];
    const onLogits = (l) => logits.push(Array.from(l));
    for await (const token of this.generateIds(promptIds, { maxTokens: steps, onLogits })) tokens.push(token);
    return { tokens, logits };
  }
}
