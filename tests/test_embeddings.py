"""Sentence embeddings with all-MiniLM-L6-v2 (BERT from its safetensors checkpoint): the
compiled model against the numpy forward pass on llvm (float32: 1e-4; float16 on request:
2e-3) and on WebGPU and OpenCL (1e-3), padding to a bucket changing nothing (1e-6),
similarity ranking paraphrases first, `tapml embed` and `tapml.load(...).embed`, and clear
errors for what cannot be embedded."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tapml.cli import main
from tapml.compiler import load_model_file
from tapml.errors import ModelNotFound, TapmlError
from tapml.models import MODELS
from tapml.runtime.embedder import Embedder
from tapml.targets import TARGETS, executes_here

MODEL = "all-minilm-l6-v2"
LLVM_ATOL = 1e-4  # float32 kernels against float64 numpy, per vector element (unit vectors)
GPU_ATOL = 1e-3
FLOAT16_ATOL = 2e-3  # float16 weights and activations (kernels accumulate in float32)
PADDING_ATOL = 1e-6
LONG = " ".join(["Rivers carry water from the hills to the sea, shaping valleys on the way."] * 14)
TEXTS = [
    "A cat sleeps on the sofa.",
    "The quarterly report shows revenue grew by twelve percent.",
    "¿Dónde está la estación de tren? Le train part à midi.",
    LONG,  # over 128 tokens: the 1x256 bucket
]
# (query, paraphrase, unrelated sentences): the paraphrase must rank first
LABELLED = [
    ("How do I reset my password?", "What are the steps to change a forgotten password?",
     ["The weather is sunny in Madrid today.", "He plays the violin in an orchestra."]),
    ("A man is playing a guitar.", "Someone strums a guitar.",
     ["A chef is slicing onions.", "The train arrived late at the station."]),
    ("The stock market fell sharply.", "Share prices dropped steeply.",
     ["Children are building a sandcastle.", "The recipe needs two eggs."]),
]  # fmt: skip


@pytest.fixture(scope="module")
def llvm(minilm_artifact) -> Embedder:
    return Embedder(minilm_artifact("llvm"))


@pytest.fixture(scope="module")
def numpy_reference():
    """texts' ids -> the float64 numpy forward pass over the checkpoint's own weights."""
    model = load_model_file(MODELS[MODEL].gguf_path())
    weights = model.float_weights()
    return lambda rows: model.architecture.reference(weights, model.config, rows)


def on(target: str, minilm_artifact) -> Embedder:
    ok, why = executes_here(TARGETS[target])
    if not ok:
        pytest.skip(f"{target} does not execute here: {why}")
    return Embedder(minilm_artifact(target))


@pytest.mark.real_model
def test_embeddings_equal_the_numpy_forward_pass_on_llvm(llvm, numpy_reference):
    rows = llvm.tokenize(TEXTS)
    assert [r[0] for r in rows] == [llvm.tokenizer.bos_id] * 4  # [CLS] ... [SEP]
    assert {len(r) > 128 for r in rows} == {False, True}  # the 8x128 and 1x256 buckets run
    got = llvm.embed(TEXTS)
    assert got.shape == (4, 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(got, numpy_reference(rows), atol=LLVM_ATOL)


@pytest.mark.real_model
@pytest.mark.parametrize("target", ["webgpu", "opencl"])
def test_embeddings_on_gpu_targets_equal_the_numpy_forward_pass(target, minilm_artifact,
                                                                numpy_reference):  # fmt: skip
    embedder = on(target, minilm_artifact)
    rows = embedder.tokenize(TEXTS)
    np.testing.assert_allclose(embedder.embed(TEXTS), numpy_reference(rows), atol=GPU_ATOL)


@pytest.mark.real_model
def test_float16_on_request_stays_close_to_the_float32_reference(numpy_reference):
    from tapml.api import ensure_compiled

    embedder = Embedder(ensure_compiled(MODEL, "llvm", "q0f16", progress=False))
    assert embedder.config["options"]["quantization"] == "q0f16"
    rows = embedder.tokenize(TEXTS)
    np.testing.assert_allclose(embedder.embed(TEXTS), numpy_reference(rows), atol=FLOAT16_ATOL)


@pytest.mark.real_model
def test_padding_to_a_bucket_never_changes_a_vector(llvm):
    (row,) = llvm.tokenize(TEXTS[:1])
    others = llvm.tokenize(TEXTS[1:3])
    vectors = {}
    for bucket in llvm.task.buckets:  # alone in each bucket, first or last of a batch
        batch = [row] if bucket["batch"] == 1 else [*others, row]
        out = llvm.executor.run(*llvm.task.call(bucket, batch))
        vectors[bucket["function"]] = out[len(batch) - 1]
    assert set(vectors) == {"embed_1x128", "embed_8x128", "embed_1x256"}
    alone = vectors["embed_1x128"]
    for name, vector in vectors.items():
        np.testing.assert_allclose(vector, alone, atol=PADDING_ATOL, err_msg=name)


@pytest.mark.real_model
def test_similarity_ranks_paraphrases_above_unrelated_sentences(llvm):
    for query, paraphrase, unrelated in LABELLED:
        vectors = llvm.embed([query, paraphrase, *unrelated])
        scores = vectors[1:] @ vectors[0]
        assert scores.argmax() == 0, (query, scores)
        assert scores[0] > 0.5 > scores[1:].max(), (query, scores)


def test_texts_go_to_the_shortest_bucket_in_its_largest_batches(llvm):
    runs = [(b["function"], members) for b, members in llvm.batches([5, 200, 7, 9, 130, 12])]
    assert runs == [("embed_8x128", [0, 2, 3, 5]), ("embed_1x256", [1]), ("embed_1x256", [4])]
    runs = [(b["function"], members) for b, members in llvm.batches([5] * 9)]
    assert runs == [("embed_8x128", list(range(8))), ("embed_1x128", [8])]


@pytest.mark.real_model
def test_cli_embed_prints_one_vector_per_text(llvm, minilm_artifact, tmp_path):
    artifact = str(minilm_artifact("llvm"))
    lines = tmp_path / "texts.txt"
    lines.write_text("Share prices dropped steeply.\n\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["-q", "embed", artifact, TEXTS[0], "--file", str(lines),
                                       "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    want = llvm.embed([TEXTS[0], "Share prices dropped steeply."])
    assert doc["model"] == artifact
    np.testing.assert_allclose(np.array(doc["embeddings"]), want, atol=1e-7)
    result = CliRunner().invoke(main, ["-q", "embed", artifact, TEXTS[0], LONG + " " + LONG])
    assert result.exit_code == 0, result.output
    printed = [np.array(line.split(), float) for line in result.stdout.splitlines()]
    assert [len(v) for v in printed] == [384, 384]
    np.testing.assert_allclose(printed[0], want[0], atol=1e-6)
    assert "text 2 has 450 tokens; only its first 256 are embedded" in result.stderr


@pytest.mark.real_model
def test_load_gives_an_embedder_and_run_refuses_an_embedding_model(minilm_artifact):
    import tapml

    artifact = minilm_artifact("llvm")
    vectors = tapml.load(artifact).embed(["A cat sleeps on the sofa."])
    assert isinstance(vectors, np.ndarray) and vectors.shape == (1, 384)
    result = CliRunner().invoke(main, ["run", str(artifact), "-p", "Hello"])
    assert result.exit_code == 1
    assert "not a causal LM (embed texts with `tapml embed`)" in result.output


def test_bench_points_an_embedding_model_to_its_benchmark(minilm_artifact):
    for model in (MODEL, str(minilm_artifact("llvm"))):
        result = CliRunner().invoke(main, ["bench", model])
        assert result.exit_code == 2 and "bench/embeddings.py" in result.output, result.output


def test_embed_without_texts_or_with_bad_buckets_is_a_usage_error():
    result = CliRunner().invoke(main, ["embed", MODEL])
    assert result.exit_code == 2 and "give at least one TEXT" in result.output
    result = CliRunner().invoke(main, ["embed", MODEL, "hi", "--buckets", "8x128,0x64"])
    assert result.exit_code == 2 and "bucket '0x64' is not BATCHxLENGTH" in result.output


def test_a_bucket_longer_than_the_models_positions_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["compile", MODEL, "--buckets", "1x1024", "-o",
                                       str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 1
    assert "bucket 1x1024 is longer than the model's 512 positions" in result.output
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_missing_its_config_or_of_another_architecture_is_named(tmp_path):
    checkpoint = MODELS[MODEL].gguf_path()
    (tmp_path / "model.safetensors").symlink_to(checkpoint)
    with pytest.raises(ModelNotFound, match=r"config.json not found: a Hugging Face checkpoint"):
        load_model_file(tmp_path)
    config = json.loads((checkpoint.parent / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    with pytest.raises(ModelNotFound, match=r"is a 't5' checkpoint, an architecture tapml does"):
        load_model_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(ModelNotFound, match=r"hidden_act 'relu'; tapml's BERT computes erf GELU"):
        load_model_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(TapmlError, match="is not a readable checkpoint"):
        load_model_file(tmp_path)


def test_options_that_do_not_shape_an_artifact_leave_its_cache_key(tiny_gguf):
    from tapml.cache import cache_key
    from tapml.compiler import CompileOptions

    checkpoint = MODELS[MODEL].gguf_path()
    options = CompileOptions.resolve("llvm", kv_cache="float16", source=checkpoint)
    assert options.quantization == "q0f32"
    other_kv = options.replace(kv_cache="float32", max_context=512, chunk=16)
    assert cache_key(checkpoint, other_kv) == cache_key(checkpoint, options)
    assert cache_key(checkpoint, options.replace(buckets=[(1, 64)])) != cache_key(checkpoint,
                                                                                  options)
    llm = CompileOptions.resolve("llvm")
    assert cache_key(tiny_gguf, llm.replace(buckets=[(1, 64)])) == cache_key(tiny_gguf, llm)
    assert cache_key(tiny_gguf, llm.replace(kv_cache="float32")) != cache_key(tiny_gguf, llm)
