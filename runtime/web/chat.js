// chat.js: the bundle's chat page (index.html). window.tapml exposes the page's engine and
// `send` for scripts that drive the page (tapml's browser test does).
import { Engine } from "./engine.js";

const $ = (id) => document.getElementById(id);
const status = $("status");
const history = []; // the conversation so far, as {role, content}

function showError(e) {
  status.textContent = `error: ${e.message ?? e}`;
  status.className = "error";
  console.error(e);
}

function add(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text;
  $("log").append(div);
  return div;
}

function options() {
  const number = (id) => ($(id).value === "" ? null : Number($(id).value));
  const schema = $("schema").value.trim();
  return { temperature: number("temperature"), topP: number("top-p"), seed: number("seed"),
           maxTokens: number("max-tokens") ?? 64, jsonSchema: schema || null };
}

// Send `text` as the user's next message; resolves to the assistant's reply once it is complete.
async function send(text) {
  const engine = await ready;
  $("prompt").disabled = $("send").disabled = true;
  add("user", text);
  const reply = add("assistant", "");
  history.push({ role: "user", content: text });
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...history] : history;
  try {
    const chat = engine.tokenizer.chat ? { messages } : {};
    for await (const piece of engine.generate(text, { ...options(), ...chat, reusePrefix: true })) reply.textContent += piece;
    history.push({ role: "assistant", content: reply.textContent });
    const s = engine.stats;
    const note = document.createElement("div");
    note.className = "stats";
    note.textContent = `${s.prompt_tokens} prompt tokens in ${(s.prefill_ms / 1000).toFixed(1)} s` +
      (s.cached_tokens ? ` (${s.cached_tokens} kept from earlier turns); ` : "; ") +
      `${s.decode_tokens} tokens at ${(s.decode_tokens / (s.decode_ms / 1000 || 1)).toFixed(1)} tok/s (${engine.finishReason})`;
    reply.after(note);
    return reply.textContent;
  } catch (e) {
    history.pop();
    if (options().jsonSchema) reply.remove(); // an error, not output that breaks the schema
    showError(e);
    throw e;
  } finally {
    $("prompt").disabled = $("send").disabled = false;
    $("prompt").focus();
  }
}

const ready = Engine.load(new URL("./", document.baseURI), (stage, done, total) => {
  status.textContent = stage === "weights" ? `loading weights ${(100 * done / total).toFixed(0)}%` : "compiling kernels…";
});
ready.then((engine) => {
  const m = engine.bundle.manifest, s = engine.stats;
  $("title").textContent = `${m.model} (${m.quantization})`;
  status.textContent = `ready in ${(s.load_ms / 1000).toFixed(1)} s on ${[s.adapter.vendor, s.adapter.architecture].filter(Boolean).join(" ") || "WebGPU"}`;
  $("prompt").disabled = $("send").disabled = false;
}, showError);

$("form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text) return;
  $("prompt").value = "";
  send(text).catch(() => {});
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("form").requestSubmit(); }
});

window.tapml = { ready, send, Engine };
