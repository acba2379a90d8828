"""The execution plan: its structure, its file format, and its outputs against two references."""

import json

import numpy as np
import pytest
from conftest import TINY_CHUNK, TINY_CONTEXT

from tapml.artifact import describe
from tapml.compiler import CompileOptions, build_plan
from tapml.errors import PlanError
from tapml.gguf import GGUFFile
from tapml.models import ARCHITECTURES
from tapml.models.llama import reference
from tapml.models.llama.config import LlamaConfig
from tapml.plan import VERSION, CausalLM, Plan, evaluate
from tapml.quantization import QUANTIZATION, dequantize_params
from tapml.runtime.engine import Engine
from tapml.targets.relax_vm import RelaxVM
from tapml.weights import load_shards

LLAMA = ARCHITECTURES["llama"]
# Max |difference| / max |reference logit|, per activation dtype.
VM_TOLERANCE = {"float32": 1e-5, "float16": 1e-2}
NUMPY_TOLERANCE = {"float32": 1e-3, "float16": 3e-2}


@pytest.fixture(scope="module")
def tiny_config(tiny_gguf):
    g = GGUFFile(tiny_gguf)
    return LlamaConfig.from_gguf(g.metadata, g.tensor_names())


def tiny_plan(config, quantization, kv_cache=None, formats=None):
    kv_cache = kv_cache or QUANTIZATION[quantization].dtype  # as the tiny_artifact fixture's
    options = CompileOptions.resolve("llvm", quantization, TINY_CONTEXT, TINY_CHUNK,
                                     kv_cache=kv_cache)  # fmt: skip
    return build_plan(LLAMA, config, QUANTIZATION[quantization], options, formats)


def test_plan_is_a_straight_line_of_kernel_calls(tiny_config):
    _, plan, _ = tiny_plan(tiny_config, "q4f32_1")
    assert set(plan.functions) == {"decode", "prefill"}
    assert plan.functions["decode"]["scalars"] == ["pos"]
    assert plan.functions["prefill"]["scalars"] == ["pos", "n_valid"]
    assert len(plan.names("state")) == 2 * tiny_config.num_layers
    # the dequantize is fused into the matmuls: no kernel only dequantizes
    assert any("dequantize_matmul" in k for k in plan.kernels)
    assert not [k for k in plan.kernels if k.startswith("dequantize") and "matmul" not in k
                and "take" not in k]  # fmt: skip
    for f in plan.functions.values():
        for call in f["calls"]:
            storages = [plan.buffers[plan.root(a["buffer"])].get("storage")
                        for a in call["args"] if "buffer" in a]  # fmt: skip
            used = [s for s in storages if s]
            assert len(used) == len(set(used)), f"{call['kernel']} aliases a storage"


def test_temporaries_share_storage(tiny_config):
    _, plan, _ = tiny_plan(tiny_config, "q0f32")
    temps = plan.names("temp")
    assert len(plan.storages) < len(temps) / 3
    assert sum(plan.storages.values()) < sum(plan.nbytes(t) for t in temps) / 3


def test_plan_file_roundtrip_and_errors(tiny_config, tmp_path):
    _, plan, _ = tiny_plan(tiny_config, "q4f32_1")
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.to_dict() == plan.to_dict()
    d = json.loads((tmp_path / "plan.json").read_text())
    d["version"] = 99
    (tmp_path / "v.json").write_text(json.dumps(d))
    with pytest.raises(PlanError, match="version 99"):
        Plan.load(tmp_path / "v.json")
    (tmp_path / "bad.json").write_text('{"format": "tapml-plan", "vers')
    with pytest.raises(PlanError, match="bad.json"):
        Plan.load(tmp_path / "bad.json")
    d["version"] = VERSION
    d["functions"]["decode"]["calls"][0]["args"][0] = {"buffer": "nowhere"}
    (tmp_path / "ref.json").write_text(json.dumps(d))
    with pytest.raises(PlanError, match="nowhere"):
        Plan.load(tmp_path / "ref.json")


def test_the_plan_says_how_to_drive_it_and_what_its_scalars_must_be(tiny_config, tiny_artifact):
    _, plan, _ = tiny_plan(tiny_config, "q4f32_1")
    task = plan.task
    assert (task["kind"], task["max_context"], task["chunk"]) == ("causal_lm", TINY_CONTEXT,
                                                                  TINY_CHUNK)  # fmt: skip
    assert task["prefill"] == {"function": "prefill", "tokens": "prefill.tokens",
                               "position": "pos", "count": "n_valid"}  # fmt: skip
    function, scalars, inputs = CausalLM(plan).decode(3, 7)
    assert (function, scalars, list(inputs)) == ("decode", {"pos": 3}, ["decode.token"])
    executor = Engine(tiny_artifact("q4f32_1")).executor
    for bad, why in (({"pos": TINY_CONTEXT}, f"pos < {TINY_CONTEXT}"), ({"pos": -1}, "pos >= 0"),
                     ({"pos": 1.5}, "integer 'pos'")):  # fmt: skip
        with pytest.raises(PlanError, match=why):
            executor.run("decode", bad, inputs)
    _, _, chunk = CausalLM(plan).prefill(TINY_CONTEXT - 2, [1, 2, 3])
    why = rf"pos \+ n_valid <= {TINY_CONTEXT}; got pos=62, n_valid=3"
    with pytest.raises(PlanError, match=why):
        executor.run("prefill", {"pos": TINY_CONTEXT - 2, "n_valid": 3}, chunk)


def test_scalar_expressions():
    expr = {"op": "add", "args": [{"var": "pos"}, {"op": "floordiv", "args": [{"var": "n"}, 2]}]}
    assert evaluate(expr, {"pos": 5, "n": 7}) == 8
    assert evaluate({"op": "div", "args": [-7, 2]}, {}) == -3  # C semantics, truncated
    assert evaluate({"op": "select", "args": [{"op": "lt", "args": [1, 2]}, 10, 20]}, {}) == 10


# each quantization with its KV cache in the activations' dtype, and llvm's float16 cache
@pytest.mark.parametrize(("quantization", "kv_cache"),
                         [(q, None) for q in QUANTIZATION] + [("q4f32_1", "float16")])  # fmt: skip
def test_plan_matches_relax_vm_and_numpy(tiny_config, tiny_artifact, quantization, kv_cache):
    artifact = tiny_artifact(quantization, "llvm", kv_cache)
    _, plan, fused = tiny_plan(tiny_config, quantization, kv_cache)
    assert plan.model["kv_cache"] == (kv_cache or QUANTIZATION[quantization].dtype)
    check_against_vm_and_numpy(artifact, tiny_config, plan, fused)
    assert describe(artifact)["options"]["quantization"] == quantization


def test_stored_blocks_plan_matches_relax_vm_and_numpy(tiny_stored_gguf, tiny_stored_artifact):
    """Every GGUF block type, and Q, K, V parts in different types (kept apart)."""
    from tapml.convert import file_sources, stored_types
    from tapml.models.llama.weights import weight_map

    g = GGUFFile(tiny_stored_gguf)
    config = LlamaConfig.from_gguf(g.metadata, g.tensor_names())
    sources = file_sources(g, weight_map(config).all())
    formats = QUANTIZATION["gguf"].formats(stored_types(
        {name: sources[name] for name in weight_map(config).matrices}))
    _, plan, fused = tiny_plan(config, "gguf", "float32", formats)
    assert "layers.0.self_attn.qkv_proj.parts.2.q_high" in plan.names("param")  # Q6_K's V
    check_against_vm_and_numpy(tiny_stored_artifact(), config, plan, fused)


def check_against_vm_and_numpy(artifact, config, plan, fused) -> None:
    """The artifact's engine against the Relax VM on the same module (`plan`, `fused`) and
    the numpy reference on the weights as the kernels read them."""
    engine = Engine(artifact)
    dtype = plan.model["dtype"]
    assert plan.buffers["k_cache_0"]["dtype"] == plan.model["kv_cache"]
    assert plan.to_dict() == engine.plan.to_dict()  # the artifact holds this very plan
    params = load_shards(artifact / "weights")
    vm = RelaxVM(fused, plan, params)
    weights = dequantize_params(params, plan.model["weight_formats"])

    tokens = [int(t) for t in np.random.default_rng(0).integers(0, config.vocab_size, 14)]
    expected = reference.forward(weights, config, tokens, kv_cache=plan.model["kv_cache"])
    n_prompt = 11  # two prefill chunks of 8, the second padded
    got = [engine.prefill(tokens[:n_prompt])]
    vm_logits = [vm.run("prefill", {"pos": 0, "n_valid": 8},
                        {"prefill.tokens": np.array(tokens[:8], "int32")})]  # fmt: skip
    padded = np.zeros(8, "int32")
    padded[:3] = tokens[8:11]
    vm_logits = [vm.run("prefill", {"pos": 8, "n_valid": 3}, {"prefill.tokens": padded})]
    for pos in range(n_prompt, len(tokens)):
        got.append(engine.decode(tokens[pos]))
        vm_logits.append(vm.run("decode", {"pos": pos}, {"decode.token": np.array([tokens[pos]],
                                                                                  "int32")}))
    for step, (g, v) in enumerate(zip(got, vm_logits, strict=True)):
        ref = expected[n_prompt - 1 + step]
        scale = np.abs(ref).max()
        assert np.isfinite(g).all()
        assert np.abs(g - v).max() / scale < VM_TOLERANCE[dtype], f"step {step} vs VM"
        assert np.abs(g - ref).max() / scale < NUMPY_TOLERANCE[dtype], f"step {step} vs np"


def test_a_prefill_chunk_whose_logits_nobody_reads_runs_only_what_the_kv_cache_needs(
        tiny_config, tiny_artifact):  # fmt: skip
    _, plan, _ = tiny_plan(tiny_config, "q4f32_1")
    calls = plan.functions["prefill"]["calls"]
    kept = plan.state_calls("prefill")
    skipped = [calls[i]["kernel"] for i in range(len(calls)) if i not in kept]
    assert kept == sorted(kept) and skipped  # the output layer, the last layer's tail
    assert any("last_valid_row" in k for k in skipped)
    writes = [set(calls[i]["writes"]) for i in kept]
    assert set(plan.names("state")) <= set().union(*writes)  # every KV cache write runs

    ids = list(range(3, 3 + 2 * TINY_CHUNK + 5))  # three chunks: two advance, one runs whole
    engine = Engine(tiny_artifact("q4f32_1"))
    engine.reset()
    chunked = engine.prefill(ids)
    whole = Engine(tiny_artifact("q4f32_1"))
    whole.reset()
    for start in range(0, len(ids), TINY_CHUNK):
        logits = whole.executor.run(*whole.task.prefill(start, ids[start : start + TINY_CHUNK]))
    np.testing.assert_array_equal(chunked, logits[0])
    for name in plan.names("state"):
        np.testing.assert_array_equal(engine.executor.download(name),
                                      whole.executor.download(name))  # fmt: skip
