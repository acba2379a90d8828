"""A packaged SmolLM2 web bundle in headless Chromium (WebGPU on SwiftShader): the JavaScript
runtime tokenizes like Python, generates the CPU's greedy tokens with close logits, answers
in JSON that matches a schema on the chat page (whose next turn prefills only what is new),
names a missing limit or feature, and names a corrupted shard. SwiftShader takes seconds per
token here (a prefill chunk up to two minutes), so each check is a few tokens.

The chat page's screenshot after its reply is saved under $TAPML_TEST_ARTIFACTS (or the
test's tmp directory); the path is printed.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import PROMPT, PROMPT_IDS, greedy_trace, open_page

from tapml.browser import Browser, find_chromium

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(find_chromium() is None, reason="no Chromium (bash scripts/setup.sh)"),
]

STEPS = 2  # prefill, then a decode: SwiftShader takes seconds per step here
# max |browser - cpu| / max |cpu| per logits vector: float32 on both sides, summed in other
# orders (SwiftShader's WGSL vs the llvm kernels); measured at most 3.3e-6
LOGITS_RTOL = 1e-4
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}
ENGINE = "(await window.tapml.ready)"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """good/: the real model's web bundle (the GGUF's own blocks); bad/: the same with shard 0
    corrupted."""
    from tapml.package import package

    root = tmp_path_factory.mktemp("site")
    good = package("smollm2-135m", "webgpu", root / "good", progress=False).path
    for path in good.rglob("*"):
        if path.is_file():
            twin = root / "bad" / path.relative_to(good)
            twin.parent.mkdir(parents=True, exist_ok=True)
            twin.symlink_to(path)
    shard = root / "bad" / "weights" / "params_shard_0.bin"
    shard.unlink()
    data = bytearray((good / "weights" / "params_shard_0.bin").read_bytes())
    data[12345] ^= 0x01
    shard.write_bytes(data)
    return root


@pytest.fixture(scope="module")
def page(site):
    with Browser(site, timeout=600) as browser:
        open_page(browser, "good/index.html", f"{ENGINE}.stats")
        yield browser


@pytest.fixture(scope="module")
def cpu_trace(real_artifact):
    from tapml.runtime.engine import Engine

    return greedy_trace(Engine(real_artifact("gguf")), PROMPT_IDS, STEPS)


def test_page_tokenizes_like_python(page, real_artifact):
    from tapml.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(real_artifact("gguf") / "tokenizer")
    texts = [PROMPT, "In 1969, 12345 people  walked\n\non   the Moon!", "Café ☕ — 日本語 ok?"]
    texts.append(tokenizer.apply_chat_template([{"role": "user", "content": texts[1]}]))
    got = page.evaluate(f"(async () => {{ const e = {ENGINE}; "
                        f"return {json.dumps(texts)}.map((t) => e.tokenizer.encode(t)); }})()")
    assert got == [tokenizer.encode(t) for t in texts]
    assert got[0] == PROMPT_IDS


def test_greedy_tokens_and_logits_match_the_cpu(page, cpu_trace):
    result = page.evaluate(f"(async () => {ENGINE}.trace({PROMPT_IDS}, {STEPS}))()")
    cpu_logits, cpu_ids = cpu_trace
    assert result["tokens"] == cpu_ids[:STEPS]
    errors = []
    for step, got in enumerate(result["logits"]):
        want = cpu_logits[step]
        errors.append(float(np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max()))
    print(f"browser vs cpu logits, relative error per step: {[f'{e:.1e}' for e in errors]}")
    assert len(errors) == STEPS and max(errors) <= LOGITS_RTOL, errors


@pytest.fixture(scope="module")
def json_reply(page) -> str:
    """The chat page's reply to its first message, under SCHEMA (16 tokens at most)."""
    page.evaluate(
        f"""(() => {{
          document.getElementById("schema").value = {json.dumps(json.dumps(SCHEMA))};
          document.getElementById("system").value = "Answer in JSON.";
          document.getElementById("max-tokens").value = "16";
        }})()"""
    )
    reply = page.evaluate("window.tapml.send('Which city is the capital of France?')")
    assert page.evaluate(f"(async () => {ENGINE}.finishReason)()") == "grammar"
    return reply


def test_chat_page_json_schema_reply_validates(page, json_reply, tmp_path):
    import jsonschema

    jsonschema.validate(json.loads(json_reply), SCHEMA)
    assert "\n" not in json_reply  # one line, like the Python runtime's JSON
    shown = page.evaluate("[...document.querySelectorAll('.assistant')].map((d) => d.textContent)")
    assert shown == [json_reply]
    folder = Path(os.environ.get("TAPML_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    shot = page.screenshot(folder / "chat_page.png")
    print(f"chat page screenshot: {shot} (reply {json_reply!r})")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chat_page_next_turn_keeps_the_first_in_the_kv_cache_and_shows_errors_not_broken_json(
        page, json_reply):  # fmt: skip
    def send(schema: dict, max_tokens: int):
        return page.evaluate(f"""(async () => {{
          document.getElementById("schema").value = {json.dumps(json.dumps(schema))};
          document.getElementById("max-tokens").value = "{max_tokens}";
          const shown = () => document.querySelectorAll(".assistant").length, before = shown();
          try {{ return ["sent", await window.tapml.send("Give two tags.")]; }}
          catch (e) {{ return [String(e.message ?? e), shown() - before]; }}
        }})()""")

    first = page.evaluate(f"(async () => {ENGINE}.stats)()")
    tags = {"type": "array", "items": {"type": "string"}, "uniqueItems": True}
    message, added = send(tags, 16)
    assert "cannot enforce uniqueItems" in message and added == 0, message
    message, added = send(SCHEMA, 1)
    assert "the JSON output is incomplete: maxTokens ran out" in message and added == 0, message
    # the first turn's prompt stayed in the KV cache: only what follows it was prefilled
    stats = page.evaluate(f"(async () => {ENGINE}.stats)()")
    assert stats["cached_tokens"] >= first["prompt_tokens"], (first, stats)


def test_missing_limit_and_feature_are_named(page):
    message = page.evaluate(
        """import("./runtime/executor.js")
             .then((m) => m.requestDevice({limits: {maxBufferSize: 2 ** 50},
                                           features: ["shader-f16"]}))
             .then(() => "no error", (e) => e.message)"""
    )
    assert "limit maxBufferSize: needs 1125899906842624" in message, message
    has_f16 = "(async () => (await navigator.gpu.requestAdapter()).features.has('shader-f16'))()"
    if not page.evaluate(has_f16):
        assert "feature shader-f16" in message, message


def test_corrupted_shard_is_named(page):
    page.open("bad/index.html")
    message = page.evaluate("window.tapml.ready.then(() => 'loaded', (e) => e.message)")
    assert message.startswith("weights/params_shard_0.bin fails its sha256 check"), message
    assert "params_shard_0.bin" in page.evaluate("document.getElementById('status').textContent")

