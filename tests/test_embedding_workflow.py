"""The TapML method on an embedding model: all-MiniLM-L6-v2 carved by `tapml carve` from real
texts (a query, a batch of passages, a document cut to the longest bucket), the suite replayed
bit-exactly on llvm and within tolerance on webgpu and opencl, `tapml migrate` to webgpu through
a device agent with the embeddings matching the source's, an offload whose texts leave a bucket
unrun not called a migration, and the model's matrix row (its run stage against the numpy
reference).

The model is compiled with the bundle tests' two small buckets (their webgpu and opencl builds
are shared): lavapipe takes about 25 s for one run of the default 8x128 bucket.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from tapml import compiler
from tapml.carving.replay import compiled_for
from tapml.carving.report import offload_summary
from tapml.carving.scenarios import EMBEDDING_SCENARIOS, SCENARIOS, check, default, select
from tapml.carving.suite import Suite
from tapml.cli import main
from tapml.errors import TapmlError
from tapml.matrix import Matrix
from tapml.plan import Plan
from tapml.targets import TARGETS, executes_here

MODEL = "all-minilm-l6-v2"
BUCKETS = ((4, 16), (1, 32))
CLS, SEP = 101, 102  # BERT's [CLS] and [SEP]
NOT_REPORTS = shutil.ignore_patterns("reports")


def tapml(*args: str):
    return CliRunner().invoke(main, ["-q", *args])


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Suite:
    """The default scenario (search) carved on llvm by `tapml carve`."""
    out = tmp_path_factory.mktemp("minilm") / "suite"
    result = tapml("carve", MODEL, "--buckets", "4x16,1x32", "-o", str(out), "--scenario", "search")
    assert result.exit_code == 0, result.output
    return Suite.load(out)


def runs_here(target: str) -> None:
    ok, why = executes_here(TARGETS[target])
    if not ok:
        pytest.skip(f"{target} does not execute here: {why}")


# -- scenarios by task kind --------------------------------------------------------------------
def test_scenarios_are_chosen_by_the_task_kind():
    assert default("causal_lm") is SCENARIOS["chat"] and default("embedding").name == "search"
    assert [s.name for s in select(kind="embedding")] == list(EMBEDDING_SCENARIOS)
    assert select((), ("A cat naps.",), "embedding")[0].requests == (("A cat naps.",),)
    with pytest.raises(TapmlError, match="unknown scenario 'chat' for an embedding model; "
                                         "choose one of: search, multilingual"):  # fmt: skip
        select(("chat",), (), "embedding")
    with pytest.raises(TapmlError, match="'chat' is for a causal LM, and the model is an "
                                         "embedding model"):  # fmt: skip
        check([SCENARIOS["chat"]], "embedding")


# -- carving and replay ------------------------------------------------------------------------
@pytest.mark.real_model
def test_carving_records_every_kernel_of_every_bucket_from_the_texts(suite):
    m = suite.manifest
    plan = Plan.load(compiled_for(suite, "llvm", progress=False) / "plan.json")
    assert m["model"] == MODEL and m["options"]["buckets"] == [list(b) for b in BUCKETS]
    assert set(m["kernels"]) == set(plan.kernels)  # both buckets' kernels have tests
    (scenario,) = m["scenarios"]
    assert scenario["requests"] == [list(r) for r in EMBEDDING_SCENARIOS["search"].requests]
    rows = [row for request in scenario["token_ids"] for row in request]
    assert all(row[0] == CLS and row[-1] == SEP for row in rows)
    assert max(map(len, rows)) == 32  # the document, cut to the longest bucket
    # the query runs alone in the 4x16 bucket (step 0): the first call, the token lookup,
    # reads its ids, and the attention mask keeps its positions alone
    calls = {c["id"]: c for c in suite.calls}
    lookup, masking = calls["search/0/0"], calls["search/0/3"]
    ids, mask = np.zeros((4, 16), "int32"), np.zeros((4, 16), "int32")
    ids[0, : len(rows[0])], mask[0, : len(rows[0])] = rows[0], 1
    for call, want in ((lookup, ids), (masking, mask)):
        arg = call["args"][0]
        got = suite.arrays.get(arg["before"], arg["dtype"], arg["shape"])
        np.testing.assert_array_equal(got.reshape(4, 16), want, err_msg=call["kernel"])
    assert {c["function"] for c in suite.calls} == {"embed_4x16", "embed_1x32"}
    assert all(c["scalars"] == {} for c in suite.calls)


@pytest.mark.real_model
@pytest.mark.parametrize("target", ["llvm", "webgpu", "opencl"])
def test_the_suite_passes_on_every_executing_target_and_exactly_on_llvm(suite, target):
    runs_here(target)
    result = tapml("test", str(suite.root), "--target", target)
    assert result.exit_code == 0, result.output
    report = json.loads((suite.root / "reports" / target / "report.json").read_text())
    assert report["passed"] and report["exact"] == (target == "llvm")
    assert len(report["calls"]) == len(suite.calls)
    assert {k["kernel"] for k in report["kernels"]} == set(suite.manifest["kernels"])
    if target == "llvm":
        assert all(c["max_abs"] == 0 for c in report["calls"])


# -- offload and migrate -----------------------------------------------------------------------
@pytest.mark.real_model
def test_migrating_to_webgpu_passes_every_test_and_the_embeddings_match(suite, tmp_path):
    runs_here("webgpu")
    out = tmp_path / "migrated"
    # the suite carved above, with the same settings: migrate resumes it instead of carving
    shutil.copytree(suite.root, out / "suite", ignore=NOT_REPORTS)
    result = tapml("migrate", MODEL, "--target", "webgpu", "--buckets", "4x16,1x32",
                   "-o", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["migrated"] and report["test"]["failed_calls"] == 0
    assert report["test"]["calls"] == len(suite.calls)
    offload = report["offload"]
    assert offload["scenario"] == "search" and offload["not_run"] == []
    assert offload["runs"] == 2  # the all-source reference, then every kernel on webgpu
    (step,) = offload["steps"]
    assert step["offloaded"] == len(offload["kernels"]) == len(suite.manifest["kernels"])
    assert step["ok"] and 0 <= step["divergence"] < 1e-4
    embeddings = report["embeddings"]
    assert embeddings["texts"] == 7 and embeddings["source"] == "llvm"
    assert embeddings["min_cosine"] > 0.99999 and embeddings["max_abs"] < 1e-4
    assert "webgpu alone: 7 texts embedded" in result.stdout


@pytest.mark.real_model
def test_an_offload_whose_text_leaves_a_bucket_unrun_is_not_a_migration(tmp_path):
    runs_here("webgpu")
    result = tapml("offload", MODEL, "--target", "webgpu", "--buckets", "4x16,1x32",
                   "--prompt", "A cat sleeps on the sofa.", "-o", str(tmp_path))  # fmt: skip
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["not_run"] == ["embed_1x32"] and report["culprit"] is None
    assert report["steps"][0]["ok"] and not report["migrated"]
    assert "never runs embed_1x32" in offload_summary(report)


# -- the matrix --------------------------------------------------------------------------------
@pytest.mark.real_model
def test_the_matrix_row_embeds_like_the_reference_and_carves_the_search_texts(
    suite, tmp_path, monkeypatch
):
    monkeypatch.setattr(compiler, "DEFAULT_BUCKETS", BUCKETS)  # what the matrix compiles
    matrix = Matrix(tmp_path, progress=False)
    # the matrix carves the task's default scenario with these settings: it resumes this suite
    shutil.copytree(suite.root, matrix.suite_dir(MODEL), ignore=NOT_REPORTS)
    cells = matrix.run([MODEL], ["llvm", "webgpu"], ["compile", "run", "carve", "bench"])
    for cell in cells:
        if cell.target != "llvm":
            runs_here(cell.target)
        assert cell.summary == "pass", cell.stages
        run, bench = cell.stages["run"], cell.stages["bench"]
        assert run["texts"] == 7 and run["max_abs"] < 1e-4  # against float64 numpy
        assert bench["bucket"] == "4x16" and bench["texts_per_s"] > 0
        assert cell.stages["carve"]["calls"] == len(suite.calls)
