// similarity.js: the sentence similarity page of an embedding model's bundle: the candidate
// sentences ranked by cosine similarity to a query. window.tapml exposes the page's embedder
// and `rank` for scripts that drive the page (tapml's browser test does).
import { Embedder } from "./embedder.js";

const $ = (id) => document.getElementById(id);
const status = $("status");
const controls = ["query", "candidates", "rank"].map($);
let readyText = "";

function showError(e) {
  status.textContent = `error: ${e.message ?? e}`;
  status.className = "error";
  console.error(e);
}

function show(ranked) {
  $("results").replaceChildren(...ranked.map(({ text, score }) => {
    const item = document.createElement("li"), value = document.createElement("span");
    item.style.setProperty("--score", `${Math.max(0, score) * 100}%`);
    value.className = "score";
    value.textContent = score.toFixed(3);
    item.append(value, text);
    return item;
  }));
}

// Rank `candidates` (default: the text box's non-empty lines) by similarity to `query`
// (default: the query box); shows and resolves to [{index, text, score}], most similar first.
async function rank(query = $("query").value, candidates = $("candidates").value.split("\n")) {
  const embedder = await ready;
  controls.forEach((c) => { c.disabled = true; });
  try {
    query = query.trim();
    candidates = candidates.map((c) => c.trim()).filter(Boolean);
    if (!query) throw new Error("the query is empty: type a sentence to compare the others with");
    if (!candidates.length) throw new Error("there is nothing to rank: write one sentence per line");
    const start = performance.now();
    const ranked = await embedder.rank(query, candidates);
    show(ranked);
    const cut = embedder.cut.map((i) => (i === 0 ? "the query" : `sentence ${i}`));
    $("note").textContent = `${candidates.length + 1} texts embedded in ${((performance.now() - start) / 1000).toFixed(1)} s` +
      (cut.length ? `; cut to the first ${embedder.maxLength} tokens: ${cut.join(", ")}` : "");
    status.textContent = readyText;
    status.className = "";
    return ranked;
  } catch (e) {
    showError(e);
    throw e;
  } finally {
    controls.forEach((c) => { c.disabled = false; });
  }
}

const ready = Embedder.load(new URL("./", document.baseURI), (stage, done, total) => {
  status.textContent = stage === "weights" ? `loading weights ${(100 * done / total).toFixed(0)}%` : "compiling kernels…";
});
ready.then((embedder) => {
  const m = embedder.bundle.manifest, s = embedder.stats;
  $("title").textContent = `${m.model} (${m.quantization}): sentence similarity`;
  readyText = `ready in ${(s.load_ms / 1000).toFixed(1)} s on ${[s.adapter.vendor, s.adapter.architecture].filter(Boolean).join(" ") || "WebGPU"}`;
  status.textContent = readyText;
  controls.forEach((c) => { c.disabled = false; });
}, showError);

$("form").addEventListener("submit", (event) => {
  event.preventDefault();
  rank().catch(() => {});
});

window.tapml = { ready, rank, Embedder };
