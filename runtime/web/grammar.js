// grammar.js: JSON-schema constrained output with XGrammar (@mlc-ai/web-xgrammar): before each
// token the logits of every token the grammar refuses become -Infinity.
import "./vendor/web-xgrammar.js"; // a UMD module: it defines globalThis.xgrammar

const JSON_SEPARATORS = [", ", ": "]; // as runtime/grammar.py: json.dumps spacing
const compilers = new WeakMap(); // tokenizer -> GrammarCompiler (holds the decoded vocabulary)

// The JSON Schema keywords XGrammar enforces in full here. The browser has no check after
// generation (tapml's Python runtime has one), so a schema using any other validation keyword
// is refused instead: the page never shows JSON that breaks its schema. minLength and
// maxLength are enforced except next to a pattern, which XGrammar then ignores.
export const ENFORCED_KEYWORDS = new Set(["type", "properties", "required", "additionalProperties",
  "items", "prefixItems", "minItems", "maxItems", "enum", "const", "anyOf", "$ref", "$defs",
  "definitions", "minLength", "maxLength", "pattern", "format", "minimum", "maximum",
  "exclusiveMinimum", "exclusiveMaximum", "minProperties", "maxProperties"]);
const VALIDATION_KEYWORDS = new Set([...ENFORCED_KEYWORDS, "multipleOf", "uniqueItems", "contains",
  "minContains", "maxContains", "dependentRequired", "dependencies", "dependentSchemas", "allOf",
  "oneOf", "not", "if", "then", "else", "additionalItems", "patternProperties", "propertyNames",
  "unevaluatedItems", "unevaluatedProperties", "$dynamicRef", "$recursiveRef"]);
const SUBSCHEMA = { one: ["additionalProperties", "items", "additionalItems", "not", "if", "then", "else",
  "contains", "propertyNames", "unevaluatedProperties", "unevaluatedItems"],
  list: ["anyOf", "oneOf", "allOf", "prefixItems", "items"],
  map: ["properties", "patternProperties", "$defs", "definitions", "dependentSchemas"] };

// The validation keywords of `schema` the browser cannot enforce ("minLength with pattern"...).
export function unenforcedKeywords(schema, found = new Set()) {
  if (schema === null || typeof schema !== "object" || Array.isArray(schema)) return found;
  for (const key of Object.keys(schema))
    if (VALIDATION_KEYWORDS.has(key) && !ENFORCED_KEYWORDS.has(key)) found.add(key);
  if ("pattern" in schema)
    for (const key of ["minLength", "maxLength"]) if (key in schema) found.add(`${key} with pattern`);
  for (const key of SUBSCHEMA.one) unenforcedKeywords(schema[key], found);
  for (const key of SUBSCHEMA.list) if (Array.isArray(schema[key])) schema[key].forEach((s) => unenforcedKeywords(s, found));
  for (const key of SUBSCHEMA.map)
    if (schema[key] && typeof schema[key] === "object") Object.values(schema[key]).forEach((s) => unenforcedKeywords(s, found));
  return found;
}

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
    let parsed;
    try {
      parsed = JSON.parse(text);
    } catch (e) {
      throw new Error(`invalid JSON schema: not valid JSON: ${e.message}`);
    }
    const unenforced = [...unenforcedKeywords(parsed)].sort();
    if (unenforced.length)
      throw new Error(`the browser runtime cannot enforce ${unenforced.join(", ")} in this schema, and would not ` +
        "show output that breaks it: drop those keywords, or run the model with tapml, which checks them after generation");
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
