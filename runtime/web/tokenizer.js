// tokenizer.js: text <-> token ids with the bundle's tokenizer.json (Hugging Face tokenizers,
// compiled to WebAssembly by @mlc-ai/web-tokenizers), the chat format and streaming decode.
import "./vendor/web-tokenizers.js"; // a UMD module: it defines globalThis.tokenizers

// The ids tokenizer.json's post-processor puts [before, after] one text (BERT: [CLS], [SEP]):
// web-tokenizers' encode leaves them out, where Python's adds them (tapml/tokenizer.py).
function framing(json) {
  const p = json.post_processor;
  if (!p) return [[], []];
  if (p.type === "BertProcessing" || p.type === "RobertaProcessing") return [[p.cls[1]], [p.sep[1]]];
  if (p.type !== "TemplateProcessing") throw new Error(`tokenizer.json's post-processor ${p.type} is not supported`);
  const text = p.single.findIndex((item) => "Sequence" in item);
  const ids = (items) => items.flatMap((item) => p.special_tokens[item.SpecialToken.id].ids);
  return [ids(p.single.slice(0, text)), ids(p.single.slice(text + 1))];
}

export class TextTokenizer {
  constructor(hf, config, json, chat) {
    this.hf = hf;
    this.config = config; // tokenizer_config.json: bos_id, eos_id, stop_ids, add_bos, ...
    this.json = json;
    this.chat = chat; // bundle.json "chat": the chat template as plain strings, or null
    this.stopIds = [...new Set([...config.stop_ids, ...(config.eos_id == null ? [] : [config.eos_id])])];
    // a WordPiece tokenizer's special tokens frame every text ([CLS] ... [SEP])
    this.frame = config.model === "wordpiece" ? framing(json) : [[], []];
  }

  static async load(bundle) {
    const bytes = await bundle.bytes("tokenizer/tokenizer.json");
    const config = await bundle.json("tokenizer/tokenizer_config.json");
    const hf = await globalThis.tokenizers.Tokenizer.fromJSON(bytes);
    return new TextTokenizer(hf, config, JSON.parse(new TextDecoder().decode(bytes)), bundle.manifest.chat);
  }

  get vocabSize() {
    return this.config.vocab_size;
  }

  encode(text) {
    const ids = [...this.frame[0], ...this.hf.encode(text), ...this.frame[1]];
    if (this.config.add_bos) {
      if (this.config.bos_id == null) throw new Error("the tokenizer adds a bos token but has none");
      ids.unshift(this.config.bos_id);
    }
    return ids;
  }

  decode(ids) {
    return this.hf.decode(Int32Array.from(ids));
  }

  // The prompt for [{role, content}] in the model's chat format (tapml/package.py render_chat).
  chatPrompt(messages) {
    const chat = this.chat;
    if (!chat) throw new Error("this model has no chat template: pass the prompt as plain text");
    let text = messages.length && messages[0].role === "system" ? "" : chat.first_without_system;
    for (const m of messages) {
      const turn = chat.turns[m.role];
      if (!turn) throw new Error(`the chat format has no role ${m.role}`);
      text += turn[0] + m.content + turn[1];
    }
    return text + chat.generation;
  }

  // How tokenizer.json spells tokens, in XGrammar's words: GPT-2 byte-level text, or
  // SentencePiece pieces ("\u2581" for a space, "<0x0A>" for a byte).
  get vocabType() {
    return this.config.model === "llama" ? "byte_fallback" : "byte_level";
  }

  // Each token as tokenizer.json spells it (see vocabType), control tokens as "":
  // what XGrammar's TokenizerInfo wants (tapml/runtime/grammar.py does the same).
  encodedVocabulary() {
    const tokens = new Array(this.vocabSize).fill("");
    for (const [text, id] of Object.entries(this.json.model.vocab)) if (id < tokens.length) tokens[id] = text;
    for (const t of this.json.added_tokens) if (t.id < tokens.length) tokens[t.id] = t.special ? "" : t.content;
    return tokens;
  }
}

// Text of ids as they come, holding back a character whose bytes span several tokens.
export class StreamDecoder {
  constructor(tokenizer) {
    this.tokenizer = tokenizer;
    this.ids = [];
    this.emitted = 0;
  }

  add(id) {
    this.ids.push(id);
    const text = this.tokenizer.decode(this.ids);
    if (text.endsWith("\uFFFD")) return ""; // an incomplete UTF-8 sequence so far
    const piece = text.slice(this.emitted);
    this.emitted = text.length;
    return piece;
  }

  flush() {
    const text = this.tokenizer.decode(this.ids);
    const piece = text.slice(this.emitted);
    this.emitted = text.length;
    return piece;
  }
}
