"""Checksums: a compiled model's files checked against its checksums.json before they load
(each version of a file hashed once), `tapml verify` on a compiled model, and the remembered
sha256s behind them (tapml/checksums.py)."""

import hashlib
import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import TINY_CHUNK, TINY_CONTEXT, rewrite

from tapml.cache import cache_key
from tapml.checksums import remembered_sha256
from tapml.cli import main
from tapml.compiler import CompileOptions
from tapml.errors import TapmlError
from tapml.runtime.engine import Engine


def test_a_truncated_kernel_library_is_named_before_it_loads(tiny_artifact, tmp_path, hashed):
    artifact = shutil.copytree(tiny_artifact("q4f32_1"), tmp_path / "copy")
    listed = json.loads((artifact / "checksums.json").read_text())["files"]
    assert {f["path"] for f in listed} == {
        "tapml-config.json", "plan.json", "kernels_llvm.so", "weights/index.json",
        "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"}  # fmt: skip
    Engine(artifact)
    assert "kernels_llvm.so" in hashed
    hashed.clear()
    Engine(artifact)
    assert hashed == []  # every file unchanged since it passed
    plan = artifact / "plan.json"
    rewrite(plan, plan.read_bytes().replace(b'"version": 2', b'"version": 3'))
    with pytest.raises(TapmlError, match="plan.json: fails its sha256 check"):
        Engine(artifact)
    shutil.copy(tiny_artifact("q4f32_1") / "plan.json", plan)
    library = artifact / "kernels_llvm.so"  # loaded above: truncating it in place kills this
    rewrite(library, library.read_bytes()[: library.stat().st_size // 2])  # process at exit
    with pytest.raises(TapmlError) as e:
        Engine(artifact)  # refused, where loading the library would kill the process (SIGBUS)
    assert "kernels_llvm.so: " in str(e.value) and "(truncated)" in str(e.value)
    assert "compile the model again" in str(e.value)


def test_verify_names_each_damaged_file_of_a_compiled_model(tiny_artifact, tmp_path):
    artifact = shutil.copytree(tiny_artifact("q4f32_1"), tmp_path / "copy")
    result = CliRunner().invoke(main, ["-q", "verify", str(artifact)])
    assert result.exit_code == 0 and "all intact" in result.output, result.output
    library = artifact / "kernels_llvm.so"
    library.write_bytes(library.read_bytes()[:1000])
    shard = artifact / "weights" / "params_shard_0.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(data)
    result = CliRunner().invoke(main, ["-q", "verify", str(artifact)])
    assert result.exit_code == 1
    assert "kernels_llvm.so: 1000 bytes" in result.output and "(truncated)" in result.output
    assert "weights/params_shard_0.bin: fails its sha256 check" in result.output
    assert "damaged (2 of its files); compile the model again" in result.output


def test_a_damaged_cached_build_is_compiled_again(tiny_artifact, tiny_gguf, hashed, monkeypatch):
    from tapml import api
    from tapml.cache import entry_dir

    options = CompileOptions.resolve("llvm", "q4f32_1", TINY_CONTEXT, TINY_CHUNK)
    entry = shutil.copytree(tiny_artifact("q4f32_1"), entry_dir("tiny", tiny_gguf, options))
    compiles = []
    monkeypatch.setattr(api, "compile_model", lambda *args, **kw: compiles.append(args[1]))
    assert api.compiled("tiny", tiny_gguf, options) == entry and compiles == []
    (entry / "tokenizer" / "tokenizer.json").write_text("{}")
    api.compiled("tiny", tiny_gguf, options)
    assert compiles == [entry]


def test_the_cache_key_hashes_a_gguf_once(tiny_gguf, hashed):
    options = CompileOptions.resolve()
    key = cache_key(tiny_gguf, options)
    assert cache_key(tiny_gguf, options) == key
    assert hashed == [tiny_gguf.name]


def test_a_cache_that_cannot_be_written_only_costs_hashing_again(tmp_path, monkeypatch, hashed):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("TAPML_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    data = tmp_path / "data.bin"
    data.write_bytes(b"tapml" * 100)
    for _ in range(2):
        assert remembered_sha256(data) == hashlib.sha256(b"tapml" * 100).hexdigest()
    assert hashed == ["data.bin", "data.bin"]
