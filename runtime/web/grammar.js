// grammar.js: JSON-schema constrained output with XGrammar (@mlc-ai/web-xgrammar): before each
// token the logits of every token the grammar refuses become -Infinity.
import "./vendor/web-xgrammar.js"; // a UMD module: it defines globalThis.xgrammar

const JSON_SEPARATORS = [", ", ": "]; // as runtime/grammar.py: json.dumps spacing
const compilers = new WeakMap(); // tokenizer -> GrammarCompiler (holds the decoded vocabulary)

async function compilerFor(tokenizer) {
  if (!compilers.has(tokenizer)) {
    const { TokenizerInfo, GrammarCompiler } = globalThis.xgrammar;
    compilers.set(tokenizer, TokenizerInfo.createTokenizerInfo(tokenizer.encodedVocabulary(), tokenizer.vocabType, false,
      tokenizer.vocabSize, tokenizer.stopIds).then((info) => GrammarCompiler.createGrammarCompiler(info)));
  }
  return compilers.get(tokenizer);
}

export class JsonSchemaConstraint {
  constructor(matcher, tokenizer) {
    this.matcher = matcher;
    this.stopIds = tokenizer.stopIds;
    this.bitmask = null; // the allowed tokens for the next step
  }

  // `schema`: a JSON Schema as a string or an object.
  static async create(tokenizer, schema) {
    const text = typeof schema === "string" ? schema : JSON.stringify(schema);
    const compiler = await compilerFor(tokenizer);
    let compiled;
    try {
      // indent -1: JSON on one line, as runtime/grammar.py writes it (web-xgrammar's default is 2)
      compiled = await compiler.compileJSONSchema(text, false, -1, JSON_SEPARATORS, false);
    } catch (e) {
      throw new Error(`invalid JSON schema for xgrammar: ${e.message ?? e}`);
    }
    const matcher = await globalThis.xgrammar.GrammarMatcher.createGrammarMatcher(compiled);
    return new JsonSchemaConstraint(matcher, tokenizer);
  }

  async allowed() {
    this.bitmask ??= await this.matcher.getNextTokenBitmask();
    return this.bitmask;
  }

  async mask(logits) {
    const bits = await this.allowed();
    for (let i = 0; i < logits.length; i++) if (!((bits[i >> 5] >>> (i & 31)) & 1)) logits[i] = -Infinity;
    return logits;
  }

  accept(token) {
    if (!this.matcher.acceptToken(token)) throw new Error(`the grammar refuses token ${token}`);
    this.bitmask = null;
  }

  // True once the grammar allows nothing more than a stop token.
  async isComplete() {
    if (this.matcher.isTerminated()) return true;
    const bits = Int32Array.from(await this.allowed());
    for (const id of this.stopIds) bits[id >> 5] &= ~(1 << (id & 31));
    return bits.every((w) => w === 0);
  }

  dispose() {
    this.matcher.dispose();
  }
}
