"""`tapml serve` on loopback, driven by OpenAI's own Python client and by raw HTTP: real
SmolLM2-135M (its GGUF's weights as stored) and all-MiniLM-L6-v2 on llvm, each answer checked
against tapml's Python API on the same artifact in this process."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import numpy as np
import openai
import pytest

from tapml.runtime.embedder import Embedder
from tapml.runtime.engine import Engine
from tapml.runtime.sampling import SamplingParams
from tapml.targets.remote import start_local_agent
from tapml.targets.remote.client import stop_process
from tapml.targets.remote.wire import TOKEN_ENV

pytestmark = pytest.mark.real_model

KEY = "test-key-1234"
MODEL = "smollm2-135m"
MESSAGES = [{"role": "user", "content": "Name three rivers."}]


@contextmanager
def serving(artifact: Path, name: str, *options: str, env: dict[str, str] | None = None):
    """A `tapml serve` process on a free loopback port: its API's base URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tapml", "serve", str(artifact), "--port", "0", "--name", name,
         *options], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), "tapml serve did not start"
        yield url
    finally:
        stop_process(process, 15)


@pytest.fixture(scope="module")
def artifact(real_artifact) -> Path:
    return real_artifact("gguf")


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    """SmolLM2 served with an API key and room for one waiting request."""
    key_file = tmp_path_factory.mktemp("serve") / "key"
    key_file.write_text(KEY + "\n")
    with serving(artifact, MODEL, "--api-key-file", str(key_file), "--max-queue", "1") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine(artifact):
    """The same artifact in this process: what `tapml run` answers."""
    return Engine(artifact)


def greedy_chat(engine, messages, max_tokens):
    ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages))
    text = "".join(engine.generate_text(ids, SamplingParams(max_tokens=max_tokens)))
    return text, ids


def call(url: str, method: str, path: str, body=None, key: str | None = KEY, raw=None):
    """(status, parsed JSON body) of one raw HTTP request."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    try:  # /health is the server's, the rest the API's under /v1
        conn.request(method, path if path == "/health" else parts.path + path, body=data,
                     headers=headers)  # fmt: skip
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "tapml"


def test_chat_is_tapml_runs_greedy_text(client, engine):
    want, ids = greedy_chat(engine, MESSAGES, 24)
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                            max_tokens=24)  # fmt: skip
    assert answer.choices[0].message.content == want
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == len(ids)
    assert answer.usage.completion_tokens == 24
    assert answer.usage.total_tokens == len(ids) + 24


def test_streamed_chat_is_the_same_text_with_usage(client, engine):
    want, ids = greedy_chat(engine, MESSAGES, 24)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                            max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].usage.prompt_tokens == len(ids)


def test_next_turn_reuses_the_kv_cache(client, engine):
    """A conversation's second turn finds the first in the KV cache: only the new part is
    prefilled, and the answer is that of a fresh run."""
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                           max_tokens=8).choices[0].message.content  # fmt: skip
    turn = MESSAGES + [{"role": "assistant", "content": first},
                       {"role": "user", "content": "And three mountains?"}]  # fmt: skip
    answer = client.chat.completions.create(model=MODEL, messages=turn, temperature=0,
                                            max_tokens=8)  # fmt: skip
    engine.reset()
    assert answer.choices[0].message.content == greedy_chat(engine, turn, 8)[0]
    assert answer.usage.prompt_tokens_details.cached_tokens > 30


def test_stop_strings_end_the_completion(client, engine):
    prompt = "The capital of France is"
    whole = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16)
    text = whole.choices[0].text
    assert text == "".join(engine.generate(prompt, max_tokens=16))
    stop = text.split()[2]  # a word in the middle
    cut = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16,
                                    stop=[stop])  # fmt: skip
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seed_reproduces_tapmls_sampler(client, engine):
    def sample(seed):
        return client.chat.completions.create(
            model=MODEL, messages=MESSAGES, temperature=0.9, top_p=0.95, seed=seed,
            max_tokens=16).choices[0].message.content  # fmt: skip

    first = sample(7)
    assert sample(7) == first
    ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(MESSAGES))
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=16)
    assert first == "".join(engine.generate_text(ids, params))


def test_logprobs_are_the_models(client, engine):
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                            max_tokens=4, logprobs=True, top_logprobs=3)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == 4
    ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(MESSAGES))
    engine.reset()
    logits = np.asarray(engine.prefill(ids), np.float64)[: engine.tokenizer.vocab_size]
    logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    assert entries[0].logprob == pytest.approx(logp.max(), abs=1e-4)  # greedy: the best one
    assert [t.logprob for t in entries[0].top_logprobs] == pytest.approx(
        np.sort(logp)[::-1][:3], abs=1e-4)  # fmt: skip


def test_json_schema_response_validates(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}  # fmt: skip
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A person, as JSON."}],
        temperature=0, max_tokens=60,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema, "strict": True}},
    )  # fmt: skip
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
    assert answer.choices[0].finish_reason == "stop"


def test_json_cut_short_is_an_error_not_invalid_json(client):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    cut = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "response_format": {
        "type": "json_schema", "json_schema": {"name": "named", "schema": schema}}}
    with pytest.raises(openai.UnprocessableEntityError, match="incomplete"):
        client.chat.completions.create(**cut)
    stream = client.chat.completions.create(**cut, stream=True)
    with pytest.raises(openai.APIError, match="incomplete"):
        list(stream)


LONG = "word " * 3000
BAD_REQUESTS = [
    ("malformed JSON", None, b'{"model": "smollm2-135m", "messages": [', 400, "not valid JSON"),
    ("a wrong type", {"temperature": "hot"}, None, 400, "temperature"),
    ("out of range", {"top_p": 1.5}, None, 400, "top_p"),
    ("an unknown field", {"frobnicate": 1}, None, 400, "frobnicate"),
    ("NaN", None, b'{"model": "smollm2-135m", "messages": [], "temperature": NaN}', 400, "NaN"),
    ("no messages", {"messages": []}, None, 400, "messages"),
    ("a bad role", {"messages": [{"role": "wizard", "content": "hi"}]}, None, 400, "role"),
    ("tools", {"tools": [{"type": "function"}]}, None, 400, "tool"),
    ("n > 1", {"n": 2}, None, 400, "n:"),
    ("a prompt over the context", {"messages": [{"role": "user", "content": LONG}]}, None, 400,
     "maximum context length"),
    ("max_tokens beyond the context", {"max_tokens": 5000}, None, 400, "maximum context length"),
    ("a bad schema", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
     None, 400, "schema"),
    ("an unknown model", {"model": "gpt-9"}, None, 404, "gpt-9"),
    ("a huge body", None, b"{" + b" " * (5 * 2**20) + b"}", 413, "larger than"),
]  # fmt: skip


@pytest.mark.parametrize("what, change, raw, status, message", BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])  # fmt: skip
def test_bad_requests_get_openai_errors(server, what, change, raw, status, message):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **(change or {})}
    got, answer = call(server, "POST", "/chat/completions", body, raw=raw)
    assert got == status, answer
    assert message in answer["error"]["message"] and answer["error"]["type"]
    assert call(server, "GET", "/health")[0] == 200  # and it serves on


def test_api_key_is_required(server):
    for key, code in ((None, "missing_api_key"), ("wrong", "invalid_api_key")):
        status, answer = call(server, "GET", "/models", key=key)
        assert status == 401 and answer["error"]["code"] == code
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="wrong", max_retries=0).models.list()


def test_unknown_paths_and_methods(server):
    assert call(server, "GET", "/nothing")[0] == 404
    assert call(server, "GET", "/chat/completions")[0] == 405


def test_completions_field_checks(server):
    body = {"model": MODEL, "prompt": [1, 2, 10**9], "max_tokens": 2}
    status, answer = call(server, "POST", "/completions", body)
    assert status == 400 and "outside the vocabulary" in answer["error"]["message"]
    status, answer = call(server, "POST", "/embeddings", {"model": MODEL, "input": "hi"})
    assert status == 400 and "/v1/chat/completions" in answer["error"]["message"]


@contextmanager
def streaming(url: str, max_tokens: int, **fields):
    """A streamed chat request, its first event read: (the connection, its response)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "stream": True,
            **fields}
    conn.request("POST", parts.path + "/chat/completions", json.dumps(body),
                 {"Authorization": f"Bearer {KEY}"})  # fmt: skip
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    try:
        yield conn, response
    finally:
        conn.close()


def wait_for(url: str, ready, what: str) -> dict:
    for _ in range(600):
        health = call(url, "GET", "/health")[1]
        if ready(health):
            return health
        time.sleep(0.1)
    raise AssertionError(f"the server never got to {what}: {health}")


def test_full_queue_is_429_and_a_client_that_goes_frees_the_model(server, client):
    before = call(server, "GET", "/health")[1]
    # a thousand numbers at least: the reply runs until its client goes (a chat's own reply
    # can end at its end-of-turn token before the waiting request is seen)
    endless = {"type": "json_schema", "json_schema": {"name": "numbers", "schema": {
        "type": "array", "items": {"type": "integer"}, "minItems": 1000}}}
    with streaming(server, 1500, response_format=endless):
        waiting = []
        thread = threading.Thread(target=lambda: waiting.append(client.chat.completions.create(
            model=MODEL, messages=MESSAGES, temperature=0, max_tokens=4)))  # fmt: skip
        thread.start()
        wait_for(server, lambda h: h["waiting"] == 1, "one waiting request")
        status, answer = call(server, "POST", "/chat/completions",
                              {"model": MODEL, "messages": MESSAGES, "max_tokens": 4})
        assert status == 429 and answer["error"]["code"] == "rate_limit_exceeded"
    # the streaming client went: its generation stops at the next token, the waiting one runs
    thread.join(120)
    assert waiting and waiting[0].choices[0].finish_reason == "length"
    after = wait_for(server, lambda h: h["cancelled"] > before["cancelled"], "the cancel")
    assert after["refused"] == before["refused"] + 1 and after["running"] == 0


@pytest.fixture(scope="module")
def embedding_server(minilm_artifact):
    with serving(minilm_artifact("llvm"), "all-minilm-l6-v2") as url:
        yield url


def test_embeddings_are_tapmls(embedding_server, minilm_artifact):
    texts = ["A cat sleeps on the sofa.", "A kitten naps on the couch.", "Stock prices fell."]
    client = openai.OpenAI(base_url=embedding_server, api_key="unused", max_retries=0)
    answer = client.embeddings.create(model="all-minilm-l6-v2", input=texts)  # base64 on the wire
    got = np.array([d.embedding for d in answer.data], np.float32)
    want = Embedder(minilm_artifact("llvm")).embed(texts)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert answer.usage.prompt_tokens > 3 * 5
    status, floats = call(embedding_server, "POST", "/embeddings",
                          {"model": "all-minilm-l6-v2", "input": texts[0]}, key=None)
    assert status == 200
    np.testing.assert_allclose(floats["data"][0]["embedding"], want[0], atol=1e-6)
    status, answer = call(embedding_server, "POST", "/chat/completions",
                          {"model": "all-minilm-l6-v2", "messages": MESSAGES}, key=None)
    assert status == 400 and "/v1/embeddings" in answer["error"]["message"]


def test_kernels_on_a_remote_device(artifact, engine):
    """--device: the model's kernels run in a device agent (llvm's, on loopback)."""
    want, _ = greedy_chat(engine, MESSAGES, 8)
    with start_local_agent("llvm", trust_native_code=True) as agent, \
            serving(artifact, MODEL, "--device", agent, env={TOKEN_ENV: agent.token}) as url:
        status, answer = call(url, "POST", "/chat/completions", {
            "model": MODEL, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}, key=None)
    assert status == 200 and answer["choices"][0]["message"]["content"] == want


def test_exposed_without_key_is_refused(artifact):
    result = subprocess.run([sys.executable, "-m", "tapml", "serve", str(artifact), "--host",
                             "0.0.0.0", "--port", "0"], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 1 and "without an API key" in result.stderr
