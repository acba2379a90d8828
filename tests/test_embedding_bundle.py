"""all-MiniLM-L6-v2 packaged for webgpu and android: the web bundle's similarity page in
headless Chromium (WebGPU on SwiftShader) tokenizes, batches and embeds like the Python
Embedder on llvm, ranks a paraphrase first and names what it cannot do; the android bundle
holds the opencl plan and kernels and replays them on the opencl executor like the CPU.

The bundles are compiled with two small buckets: SwiftShader computes about 0.3 GFLOP/s here,
so the default 8x128 bucket alone takes a minute a call (the page's batching is checked
against Python's on the default buckets, which needs no kernels). The page's screenshot
after ranking is saved under $TAPML_TEST_ARTIFACTS (or the test's tmp directory).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import open_page

from tapml.browser import Browser, find_chromium
from tapml.cli import main
from tapml.package import MANIFEST, VERSION, package, read_manifest, runtime_web_dir, verify
from tapml.runtime.embedder import Embedder
from tapml.targets import TARGETS, executes_here

pytestmark = pytest.mark.real_model

MODEL = "all-minilm-l6-v2"
BUCKETS = ((4, 16), (1, 32))
ATOL = 1e-3  # float32 on both sides, summed in other orders (SwiftShader or PoCL vs llvm)
LONG = "Rivers carry water from the hills to the sea, shaping valleys on the way, " * 3
# embedded: two texts for the 4x16 bucket, one over 32 tokens cut to the 1x32 bucket
TEXTS = ["A cat sleeps on the sofa.", "Café ☕ — 日本語 OK? [SEP] inside.", LONG]
# only tokenized: what normalizing and splitting could treat otherwise
TRICKY = [
    *TEXTS,
    "The quarterly report shows revenue grew by 12.5% (over $3,000,000)!",
    "  Tabs\tand\nnewlines,\u00a0no-break spaces, ÀÉÎÕÜ ß ﬁ ﬀ, ½ ², e\u0301, \u200b zero width.",
    "中文字符、한국어 and العربية mixed with emoji 👩‍👩‍👧 and \x07 control characters.",
    "Pneumonoultramicroscopicsilicovolcanoconiosis " + "x" * 120,  # a word past 100 chars: [UNK]
    "",
]
QUERY, PARAPHRASE = "How do I reset my password?", "What are the steps to change a lost password?"
UNRELATED = ["The weather is sunny in Madrid today.", "He plays the violin in an orchestra."]
EMBEDDER = "(await window.tapml.ready)"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """The model's webgpu and android bundles, packaged once (android by the command line)."""
    root = tmp_path_factory.mktemp("minilm-bundles")
    web = package(MODEL, "webgpu", root / "webgpu", progress=False, buckets=BUCKETS).path
    buckets = ",".join(f"{b}x{s}" for b, s in BUCKETS)
    result = CliRunner().invoke(main, ["-q", "package", MODEL, "--target", "android", "--buckets",
                                       buckets, "-o", str(root / "android")])  # fmt: skip
    assert result.exit_code == 0, result.output
    return {"webgpu": web, "android": Path(result.stdout.strip())}


@pytest.fixture(scope="module")
def llvm(minilm_artifact) -> Embedder:
    return Embedder(minilm_artifact("llvm"))


@pytest.fixture(scope="module")
def page(bundles):
    if find_chromium() is None:
        pytest.skip("no Chromium (bash scripts/setup.sh)")
    with Browser(bundles["webgpu"], timeout=300) as browser:
        open_page(browser, "index.html", f"{EMBEDDER}.stats")
        yield browser


def in_page(page, body: str):
    """The value of an async function body run in the page, with `e` the page's embedder."""
    return page.evaluate(f"(async () => {{ const e = {EMBEDDER}; {body} }})()")


def test_web_bundle_records_the_task_and_opens_the_similarity_page(bundles):
    bundle = bundles["webgpu"]
    manifest = read_manifest(bundle)
    assert (manifest["version"], manifest["platform"], manifest["target"]) == (
        VERSION, "webgpu", "webgpu")  # fmt: skip
    assert manifest["task"] == {"kind": "embedding", "dim": 384, "max_length": 32}
    assert manifest["chat"] is None
    files = {f["path"] for f in manifest["files"]}
    assert {"runtime/embedder.js", "runtime/similarity.js", "runtime/load.js",
            "runtime/vendor/web-tokenizers.js"} <= files  # fmt: skip
    page = (runtime_web_dir() / "similarity.html").read_bytes()
    assert (bundle / "index.html").read_bytes() == page
    assert verify(bundle) == []


def test_page_tokenizes_like_python(page, llvm):
    got = in_page(page, f"return {json.dumps(TRICKY)}.map((t) => e.tokenizer.encode(t));")
    assert got == [llvm.tokenizer.encode(t) for t in TRICKY]
    assert {(ids[0], ids[-1]) for ids in got} == {(101, 102)}  # [CLS] ... [SEP]
    assert 102 in got[1][1:-1]  # "[SEP]" written in a text is the special token, as in Python


def test_page_batches_like_python_on_the_default_buckets(page, llvm):
    cases = [[5, 200, 7, 9, 130, 12], [5] * 9, [3] * 17 + [256, 129], [128, 1]]
    task = json.dumps(llvm.plan.task)
    got = page.evaluate(f"""(() => {{
        const e = new window.tapml.Embedder({{ executor: {{ plan: {{ task: {task} }} }} }});
        return {json.dumps(cases)}.map((n) => e.batches(n).map((r) => [r.bucket.function,
                                                                       r.members]));
    }})()""")
    assert got == [[[b["function"], m] for b, m in llvm.batches(n)] for n in cases]
    message = page.evaluate(f"""(() => {{
        const e = new window.tapml.Embedder({{ executor: {{ plan: {{ task: {task} }} }} }});
        try {{ e.batches([4, 257]); }} catch (error) {{ return error.message; }}
    }})()""")
    assert message == "row 1 has 257 tokens; the buckets hold 1 to 256"


def test_page_embeddings_match_python_on_llvm(page, llvm):
    result = in_page(page, f"""const texts = {json.dumps(TEXTS)}, vectors = await e.embed(texts);
        return {{ vectors: vectors.map((v) => Array.from(v)), cut: e.cut,
                  rows: e.tokenize(texts) }};""")
    rows = result["rows"]
    assert result["cut"] == [2] and len(rows[2]) == 32 and rows[2][-1] == 102
    assert max(map(len, rows[:2])) <= 16  # the 4x16 and the 1x32 buckets run
    got = np.asarray(result["vectors"], np.float32)
    want = llvm.embed_ids(rows)
    print(f"page vs llvm: max |difference| {np.abs(got - want).max():.1e}")
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_page_ranks_the_paraphrase_first_and_shows_the_scores(page, llvm, tmp_path):
    candidates = [UNRELATED[0], PARAPHRASE, UNRELATED[1]]
    lines = "\n".join(candidates) + "\n"  # the text box, as a user fills it
    page.evaluate(f"""(() => {{
        document.getElementById("query").value = {json.dumps(QUERY)};
        document.getElementById("candidates").value = {json.dumps(lines)};
    }})()""")
    ranked = page.evaluate("window.tapml.rank()")
    assert [r["text"] for r in ranked][0] == PARAPHRASE
    scores = [r["score"] for r in ranked]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.5 > scores[1]
    vectors = llvm.embed([QUERY, *candidates])
    want = [float(vectors[1 + r["index"]] @ vectors[0]) for r in ranked]
    np.testing.assert_allclose(scores, want, atol=ATOL)
    shown = page.evaluate("[...document.querySelectorAll('#results li')].map((l) => l.textContent)")
    assert shown == [f"{r['score']:.3f}{r['text']}" for r in ranked]
    assert not page.evaluate("document.getElementById('status').className")  # no error
    folder = Path(os.environ.get("TAPML_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    shot = page.screenshot(folder / "similarity_page.png")
    print(f"similarity page screenshot: {shot}")


@pytest.mark.parametrize("query, candidates, message", [
    ("  ", [PARAPHRASE], "the query is empty"),
    (QUERY, ["", "  "], "there is nothing to rank"),
])  # fmt: skip
def test_page_names_what_it_cannot_rank(page, query, candidates, message):
    got = page.evaluate(f"window.tapml.rank({json.dumps(query)}, {json.dumps(candidates)})"
                        ".then(() => 'ranked', (e) => e.message)")  # fmt: skip
    assert got.startswith(message), got
    shown = page.evaluate("[document.getElementById('status').textContent, "
                          "document.getElementById('status').className]")  # fmt: skip
    assert shown == [f"error: {got}", "error"]


def test_the_chat_engine_refuses_an_embedding_bundle(page):
    message = page.evaluate("import('./runtime/engine.js').then((m) => m.Engine.load("
                            "new URL('./', location.href))).then(() => 'loaded', (e) => e.message)")
    assert message == "this bundle's task is embedding, not causal_lm"


def test_android_bundle_holds_the_opencl_plan_and_kernels(bundles):
    from tapml.api import ensure_compiled

    bundle = bundles["android"]
    manifest = read_manifest(bundle)
    assert (manifest["platform"], manifest["target"]) == ("android", "opencl")
    assert manifest["task"] == {"kind": "embedding", "dim": 384, "max_length": 32}
    assert manifest["requirements"]["api"] == "opencl"
    files = {f["path"] for f in manifest["files"]}
    assert "index.html" not in files and not any(f.startswith("runtime/") for f in files)
    artifact = ensure_compiled(MODEL, "opencl", buckets=BUCKETS, progress=False)
    for name in ("plan.json", "kernels_opencl.json", "tokenizer/tokenizer.json"):
        assert (bundle / name).read_bytes() == (artifact / name).read_bytes(), name
    assert MANIFEST not in files and verify(bundle) == []


def test_android_bundle_replays_on_opencl_like_the_cpu(bundles, llvm):
    ok, why = executes_here(TARGETS["opencl"])
    if not ok:
        pytest.skip(f"opencl does not execute here: {why}")
    embedder = Embedder(bundles["android"])
    assert embedder.target == "opencl"
    rows = embedder.tokenize(TEXTS)
    np.testing.assert_allclose(embedder.embed_ids(rows), llvm.embed_ids(rows), atol=ATOL)
