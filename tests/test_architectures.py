"""Architectures are plug-ins: one registered from this test (tests/tinyqk/, a folder like those
under models/) goes through compile, run, carve, replay on webgpu and offload to webgpu with
nothing else in tapml knowing it; its logits equal its own numpy reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tinyqk

from tapml.artifact import Artifact
from tapml.carving.scenarios import Scenario
from tapml.carving.workflow import migrate_model
from tapml.compiler import CompileOptions, compile_model, load_model_file
from tapml.models import ARCHITECTURES, MODELS
from tapml.quantization import dequantize_params
from tapml.runtime.engine import Engine
from tapml.targets import TARGETS, executes_here

LAYERS, HIDDEN, INTER, HEADS, KV_HEADS = 2, 64, 96, 4, 2


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "tinyqk", tinyqk.ARCHITECTURE)


@pytest.fixture(scope="module")
def tinyqk_gguf(tmp_path_factory) -> Path:
    """A random TinyQK GGUF with SmolLM2's tokenizer, written with gguf's own writer."""
    import gguf

    from tapml.gguf import GGUFFile

    source = GGUFFile(MODELS["smollm2-135m"].gguf_path()).metadata
    path = tmp_path_factory.mktemp("tinyqk") / "tinyqk.gguf"
    w = gguf.GGUFWriter(str(path), arch="tinyqk")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model(source["tokenizer.ggml.model"])
    w.add_tokenizer_pre(source["tokenizer.ggml.pre"])
    w.add_token_list(source["tokenizer.ggml.tokens"])
    w.add_token_merges(source["tokenizer.ggml.merges"])
    w.add_token_types(source["tokenizer.ggml.token_type"])
    w.add_eos_token_id(source["tokenizer.ggml.eos_token_id"])
    rng = np.random.default_rng(0)
    vocab, head_dim = len(source["tokenizer.ggml.tokens"]), HIDDEN // HEADS

    def add(name: str, *shape: int, around: float = 0.0) -> None:
        data = around + rng.standard_normal(shape) / np.sqrt(shape[-1] if around == 0 else 10)
        w.add_tensor(name, data.astype(np.float32))

    add("token_embd.weight", vocab, HIDDEN)
    for i in range(LAYERS):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", HIDDEN, around=1.0)
        for p, rows in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
            add(b + f"attn_{p}.weight", rows * head_dim, HIDDEN)
            add(b + f"attn_{p}.bias", rows * head_dim, around=0.1)
        add(b + "attn_q_norm.weight", head_dim, around=1.0)
        add(b + "attn_k_norm.weight", head_dim, around=1.0)
        add(b + "attn_output.weight", HIDDEN, HEADS * head_dim)
        add(b + "ffn_norm.weight", HIDDEN, around=1.0)
        add(b + "ffn_gate.weight", INTER, HIDDEN)
        add(b + "ffn_up.weight", INTER, HIDDEN)
        add(b + "ffn_down.weight", HIDDEN, INTER)
    add("output_norm.weight", HIDDEN, around=1.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_its_logits_equal_its_own_numpy_reference(registered, tinyqk_gguf, tmp_path):
    options = CompileOptions.resolve("llvm", "q0f32", 64, 8, kv_cache="float32")
    engine = Engine(compile_model(tinyqk_gguf, tmp_path / "llvm", options, progress=False))
    assert engine.config["model"]["architecture"] == "tinyqk"
    model = load_model_file(tinyqk_gguf)
    weights = dequantize_params(Artifact(engine.artifact).weights(),
                                engine.plan.model["weight_formats"])  # fmt: skip
    tokens = [5, 77, 1000, 23, 9, 400, 31, 8, 99, 1234, 77]
    expected = tinyqk.reference.forward(weights, model.config, tokens, kv_cache="float32")
    got = [engine.prefill(tokens[:9])] + [engine.decode(t) for t in tokens[9:]]
    for step, logits in enumerate(got):
        want = expected[8 + step]
        assert np.abs(logits - want).max() / np.abs(want).max() < 1e-4, step


def test_it_migrates_to_webgpu_through_carve_test_and_offload(registered, tinyqk_gguf, tmp_path):
    ok, why = executes_here(TARGETS["webgpu"])
    if not ok:
        pytest.skip(f"webgpu does not execute here: {why}")
    scenario = Scenario("short", "a short prompt", "The capital of France is", chat=False,
                        decode_steps=3)  # fmt: skip
    report = migrate_model(str(tinyqk_gguf), "webgpu", None, tmp_path, [scenario],
                           progress=False)  # fmt: skip
    assert report["test"]["failed_calls"] == 0 and report["test"]["calls"] > 0
    assert report["offload"]["migrated"] and report["migrated"]
    assert report["completion"]
