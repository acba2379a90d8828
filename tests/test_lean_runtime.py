"""Running a compiled SmolLM2, in fresh processes: the run path imports none of the compiler,
reads each weight byte once, straight into the executor's memory, and holds one copy."""

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
from tapml.startup import rss_mb
from tapml.targets import load_executor

def read_bytes():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])

artifact = Artifact(sys.argv[1])
executor = load_executor(artifact.target, artifact.plan(), artifact.path)
shards = artifact.weights()
before, rss_before = read_bytes(), rss_mb()
executor.load_params(shards)
read, rss_after = read_bytes() - before, rss_mb()
block = executor._memory._map
start = np.frombuffer(block, np.uint8).ctypes.data
outside = [name for name in executor.plan.names("param")
           if not start <= np.from_dlpack(executor.buffers[name]).ctypes.data < start + len(block)]
print(json.dumps({"read": read, "loader_read": shards.bytes_read, "outside": outside,
                  "rss_growth_mb": rss_after - rss_before,
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
def test_weights_are_read_once_into_the_executors_memory(real_artifact):
    artifact = str(real_artifact("gguf"))
    for _ in range(2):  # the first load may hash the shards (as it reads them), the next not
        result = fresh_process(LOAD, artifact)
        shard_bytes = result["shard_bytes"]
        assert shard_bytes * 0.95 <= result["read"] <= shard_bytes * 1.05
        assert result["loader_read"] <= shard_bytes
        assert result["outside"] == []  # every parameter lives in the executor's block
        # one copy: the block's pages, not a second buffer of the shards besides
        assert result["rss_growth_mb"] <= shard_bytes / 2**20 * 1.1 + 8
