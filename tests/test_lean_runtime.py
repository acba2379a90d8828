"""Running a compiled model, in fresh processes: the run path imports none of the compiler,
and the weights run in place from the mapped shards (or, in shards written before, are read
once straight into the executor's memory): one copy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

UNWANTED = ("torch", "tvm", "tvm.relax", "wgpu", "pyopencl", "llguidance", "xgrammar", "jinja2",
            "ml_dtypes")  # fmt: skip

COMMAND = """
import json, sys
from tapml.cli import main
try:
    main(json.loads(sys.argv[1]))
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "imported": [m for m in sys.argv[2:] if m in sys.modules]}))
"""

LOAD = """
import json, sys
import numpy as np
from tapml.artifact import Artifact
from tapml.plan import CausalLM
from tapml.startup import rss_mb
from tapml.targets import load_executor

def read_bytes():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])

def mappings():
    for line in open("/proc/self/maps"):
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split("-"))
        yield low, high, fields[5] if len(fields) > 5 else ""

if sys.argv[2:] == ["unaligned"]:  # no tensor meets the alignment that mapping needs
    from tapml.weights import WeightShards
    WeightShards.mapped = lambda self, name: None
artifact = Artifact(sys.argv[1])
plan = artifact.plan()
executor = load_executor(artifact.target, plan, artifact.path)
shards = artifact.weights()
before, rss_before = read_bytes(), rss_mb()
executor.load_params(shards)
read = read_bytes() - before
executor.run(*CausalLM(plan).decode(0, 1))  # every weight is read once
block = np.frombuffer(executor._memory._map, np.uint8).ctypes.data
block = (block, block + len(executor._memory._map))
where = {}
for name in plan.names("param"):
    at = np.from_dlpack(executor.buffers[name]).ctypes.data
    if block[0] <= at < block[1]:
        where[name] = "the executor's block"
    else:
        where[name] = next((path for low, high, path in mappings() if low <= at < high), "?")
print(json.dumps({"read": read, "where": sorted(set(where.values())),
                  "rss_growth_mb": rss_mb() - rss_before,
                  "shard_bytes": sum(s["nbytes"] for s in artifact.shard_checksums())}))
"""


def fresh_process(code: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.real_model
def test_a_run_imports_neither_the_compiler_nor_torch_nor_other_targets(real_artifact):
    run = ["-q", "run", str(real_artifact("gguf")), "-p", "The capital of France is", "-n", "4"]
    result = fresh_process(COMMAND, json.dumps(run), *UNWANTED)
    assert result == {"code": 0, "imported": []}


@pytest.mark.real_model
def test_embedding_imports_neither_the_compiler_nor_torch(minilm_artifact):
    embed = ["-q", "embed", str(minilm_artifact("llvm")), "A cat sleeps."]
    result = fresh_process(COMMAND, json.dumps(embed), *UNWANTED)
    assert result == {"code": 0, "imported": []}


@pytest.mark.real_model
def test_weights_run_in_place_from_the_mapped_shards(real_artifact):
    artifact = real_artifact("gguf")
    result = fresh_process(LOAD, str(artifact))
    # every parameter lies in a shard file mapped into the process: nothing read, no copy
    shards = {str(p.resolve()) for p in (artifact / "weights").glob("params_shard_*.bin")}
    assert set(result["where"]) <= shards, result["where"]
    assert result["read"] <= 0.05 * result["shard_bytes"]
    # one copy of the weights resident once a decode step has read them all (a second copy
    # would double it); the KV cache and temporaries it touched are small beside them
    assert result["rss_growth_mb"] <= result["shard_bytes"] / 2**20 * 1.1 + 40


@pytest.mark.real_model
def test_weights_whose_offsets_miss_the_alignment_are_read_once_into_the_block(real_artifact):
    # as in shards tapml wrote before they were mapped (16-byte offsets): here no tensor maps
    result = fresh_process(LOAD, str(real_artifact("gguf")), "unaligned")
    assert result["where"] == ["the executor's block"]
    assert result["shard_bytes"] * 0.95 <= result["read"] <= result["shard_bytes"] * 1.05
    assert result["rss_growth_mb"] <= result["shard_bytes"] / 2**20 * 1.1 + 40
