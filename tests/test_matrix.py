"""`tapml matrix`: every stage for every model on every target, as a table that resumes."""

import json

import pytest
from click.testing import CliRunner

from tapml import matrix as matrices
from tapml.cli import main
from tapml.errors import TapmlError
from tapml.matrix import Matrix, table


def test_a_failing_stage_is_named_and_the_row_stops_there(tiny_gguf, tmp_path, monkeypatch):
    def broken(m, model, target):
        raise TapmlError("the kernels are upside down")

    monkeypatch.setitem(matrices._STAGES, "carve", broken)
    cells = Matrix(tmp_path, progress=False).run([str(tiny_gguf)], ["llvm", "metal"],
                                                 ["compile", "run", "carve", "test"])  # fmt: skip
    llvm, metal = cells
    assert llvm.summary == "carve: TapmlError: the kernels are upside down"
    assert "test" not in llvm.stages  # nothing after the failure
    assert metal.summary == "compiled, not executed"
    assert metal.stages["compile"]["status"] == "pass"
    text = table(cells, ["llvm", "metal"])
    assert "| carve: TapmlError: the kernels are upside down | compiled, not executed |" in text


def test_a_second_run_resumes_from_what_the_first_recorded(tiny_gguf, tmp_path, monkeypatch):
    Matrix(tmp_path, progress=False).run([str(tiny_gguf)], ["llvm"], ["compile", "run"])
    ran = []
    monkeypatch.setitem(matrices._STAGES, "run", lambda *a: ran.append(a) or {"status": "pass"})
    Matrix(tmp_path, progress=False).run([str(tiny_gguf)], ["llvm"], ["compile", "run"])
    assert ran == []
    Matrix(tmp_path, fresh=True, progress=False).run([str(tiny_gguf)], ["llvm"], ["run"])
    assert len(ran) == 1


@pytest.mark.real_model
def test_smollm2_passes_every_stage_on_llvm_and_webgpu(tmp_path):
    args = ["-q", "matrix", "--model", "smollm2-135m", "--target", "llvm", "--target", "webgpu",
            "-o", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "| smollm2-135m | pass | pass |" in result.stdout
    state = json.loads((tmp_path / "matrix.json").read_text())["results"]["smollm2-135m"]
    assert set(state["webgpu"]) == set(matrices.STAGES)  # every stage applies to webgpu
    assert set(state["llvm"]) == set(matrices.STAGES) - {"offload", "package"}
    assert state["webgpu"]["test"]["calls"] > 0 and state["webgpu"]["bench"]["decode_tok_s"] > 0
