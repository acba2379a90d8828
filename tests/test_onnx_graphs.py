"""ONNX graphs through tapml: PP-OCR's three graphs compiled, judged against onnxruntime on the
same fixed-shape inputs, read back as text by `tapml ocr`, carved and replayed; and the errors
of graphs tapml cannot import."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from tapml.api import OCR_MODELS, ensure_compiled, load_ocr
from tapml.carving.scenarios import IMAGE_SCENARIOS
from tapml.cli import main
from tapml.compiler import CompileOptions, compile_model
from tapml.errors import CompileError, TapmlError
from tapml.graph import parse_input_shapes
from tapml.models import MODELS
from tapml.runtime.graph import GraphRunner
from tapml.runtime.text_image import render_text

# relative to the largest output, as the issue states them per target
TOLERANCES = {"llvm": 1e-4, "webgpu": 1e-3}
# WebGPU runs on a software adapter here: the detector at 320x320 and one recognizer width
# keep its runs to seconds; llvm compiles the model cards' shapes (640x640; widths 320, 640).
SHAPES = {"webgpu": {"pp-ocrv4-det": "x=1,3,320,320", "pp-ocrv4-rec": "x=1,3,48,320"}}
FONTS = Path("/usr/share/fonts/truetype")


@pytest.fixture(scope="session")
def ocr_artifacts():
    """ocr_artifacts(target) -> the three PP-OCR artifacts (detector, classifier, recognizer)."""

    def get(target: str) -> tuple[Path, Path, Path]:
        shapes = SHAPES.get(target, {})
        return tuple(ensure_compiled(name, target, progress=False,
                                     input_shapes=parse_input_shapes([shapes[name]])
                                     if name in shapes else ())
                     for name in OCR_MODELS)  # fmt: skip

    return get


@pytest.mark.parametrize("target", ["llvm", "webgpu"])
@pytest.mark.parametrize("graph", range(3), ids=OCR_MODELS)
def test_graph_outputs_equal_onnxruntime(ocr_artifacts, target, graph):
    runner = GraphRunner(ocr_artifacts(target)[graph])
    session = ort.InferenceSession(str(MODELS[OCR_MODELS[graph]].gguf_path()),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    for inputs in IMAGE_SCENARIOS["document"].ids(runner):  # a rendered page, each shape
        got = runner.run(inputs)
        want = dict(zip(runner.outputs, session.run(None, inputs), strict=True))
        for name in runner.outputs:
            assert got[name].shape == want[name].shape
            error = np.abs(got[name] - want[name]).max() / np.abs(want[name]).max()
            assert error <= TOLERANCES[target], (name, inputs[runner.inputs[0]].shape, error)


READ = [
    ("dejavu/DejaVuSans.ttf", 48, ["Hello World 2026", "tapml reads text"], False),
    ("liberation/LiberationSerif-Regular.ttf", 40, ["the quick brown fox", "3.14 and 2026"],
     False),
    ("dejavu/DejaVuSansMono.ttf", 32, ["tapml reads text", "0123456789"], False),
    (None, 36, ["tapml reads text", "0123456789"], False),  # Pillow's own font
    ("dejavu/DejaVuSerif.ttf", 44, ["Hello World 2026", "tapml reads text"], True),
]  # fmt: skip


@pytest.mark.parametrize("font, size, lines, upside_down", READ,
                         ids=[f"{Path(f or 'default').stem}-{s}{'-180' if u else ''}"
                              for f, s, _, u in READ])  # fmt: skip
def test_ocr_reads_rendered_text_on_llvm(ocr_artifacts, font, size, lines, upside_down):
    ocr = load_ocr(models=ocr_artifacts("llvm"))
    image = render_text(lines, str(FONTS / font) if font else None, size, rotate180=upside_down)
    read = [line.text for line in ocr.read(image)]
    # upside down, the last line is on top: the reading order follows the image
    assert read == (lines[::-1] if upside_down else lines)


def test_ocr_reads_rendered_text_on_webgpu(ocr_artifacts):
    ocr = load_ocr(models=ocr_artifacts("webgpu"))
    lines = ["tapml reads text", "0123456789"]
    assert [line.text for line in ocr.read(render_text(lines, None, 36))] == lines


def test_ocr_command_prints_lines_with_boxes(ocr_artifacts, tmp_path, monkeypatch):
    ocr_artifacts("llvm")  # compiled under the cards' names, as the command finds them
    image = tmp_path / "page.png"
    render_text(["Hello World 2026", "tapml reads text"], str(FONTS / "dejavu/DejaVuSans.ttf"),
                48).save(image)  # fmt: skip
    result = CliRunner().invoke(main, ["-q", "ocr", str(image), "--json"])
    assert result.exit_code == 0, result.output
    (page,) = json.loads(result.stdout)
    assert [line["text"] for line in page["lines"]] == ["Hello World 2026", "tapml reads text"]
    top, bottom = (line["box"] for line in page["lines"])
    assert len(top) == 4 and top[2][1] <= bottom[0][1] + 2


def test_ocr_command_refuses_a_file_that_is_not_an_image(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    result = CliRunner().invoke(main, ["-q", "ocr", str(bad)])
    assert result.exit_code != 0
    assert "notes.png is not an image" in result.output


def test_carved_suite_replays_bit_exact_on_llvm_and_passes_on_webgpu(ocr_artifacts, tmp_path):
    from tapml.carving.carve import carve
    from tapml.carving.replay import compiled_for, replay
    from tapml.targets import load_executor

    classifier = ocr_artifacts("llvm")[1]
    suite = carve(classifier, tmp_path / "suite", list(IMAGE_SCENARIOS.values()), "pp-ocr-cls",
                  progress=False)  # fmt: skip
    assert suite.calls
    for target in ("llvm", "webgpu"):
        artifact = compiled_for(suite, target, False)
        report = replay(suite, target, lambda plan, a=artifact, t=target: load_executor(t, plan, a),
                        target, progress=False)  # fmt: skip
        assert report.exact == (target == "llvm")
        assert not report.failed, [(c.kernel, c.max_abs, c.message) for c in report.failed]


# -- graphs tapml cannot import ---------------------------------------------------------------
def _save(tmp_path: Path, nodes, inputs, outputs, name: str = "graph.onnx", **extra) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, **extra)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _compile(path: Path, tmp_path: Path, *shapes: str) -> Path:
    options = CompileOptions.resolve("llvm", source=path, input_shapes=shapes)
    return compile_model(path, tmp_path / "out", options, progress=False)


def test_unsupported_operator_is_named_with_its_node(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    path = _save(tmp_path, [helper.make_node("Relu", ["x"], ["h"], name="first"),
                            helper.make_node("Frobnicate", ["h"], ["y"], name="mystery",
                                             domain="example.custom")],
                 [x], [y])  # fmt: skip
    with pytest.raises(CompileError, match=r"example\.custom\.Frobnicate \(node 'mystery'\)"):
        _compile(path, tmp_path)
    assert not (tmp_path / "out").exists()


def test_shapes_that_cannot_be_fixed_are_refused(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, None)
    path = _save(tmp_path, [helper.make_node("NonZero", ["x"], ["y"], name="where")], [x], [y])
    with pytest.raises(CompileError, match="not fixed by the input shapes"):
        _compile(path, tmp_path, "x=8")


def test_dynamic_input_without_a_shape_says_how_to_fix_it(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    path = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [x], [y])
    with pytest.raises(TapmlError, match=r"--input-shape x=N,3"):
        _compile(path, tmp_path)
    with pytest.raises(TapmlError, match="has no input 'z'"):
        _compile(path, tmp_path, "z=1,3")
    with pytest.raises(TapmlError, match="has 3 at axis 1, not 4"):
        _compile(path, tmp_path, "x=2,4")


def test_a_small_graph_runs_at_each_of_its_shapes(tmp_path):
    """A name given twice makes two entry points sharing the weights; inputs of another shape
    are refused, naming the compiled ones."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 2], [1, 2, 3, 4, 5, 6])
    bounds = [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in (("lo", 0), ("hi", 20))]
    path = _save(tmp_path, [helper.make_node("MatMul", ["x", "w"], ["h"]),
                            helper.make_node("Clip", ["h", "lo", "hi"], ["y"])],
                 [x], [y], initializer=[w, *bounds])  # fmt: skip
    runner = GraphRunner(_compile(path, tmp_path, "x=1,3", "x=4,3"))
    assert runner.shapes == [(1, 3), (4, 3)]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 4):
        data = np.random.default_rng(n).normal(size=(n, 3)).astype(np.float32) * 4
        np.testing.assert_allclose(runner(data), session.run(None, {"x": data})[0], rtol=1e-6)
    with pytest.raises(TapmlError, match="compiled for x=1x3; x=4x3, not x=2x3"):
        runner(np.zeros((2, 3), np.float32))


def test_missing_and_corrupt_onnx_files_are_named(tmp_path):
    with pytest.raises(TapmlError, match="ONNX file not found"):
        _compile(tmp_path / "absent.onnx", tmp_path)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(TapmlError, match="bad.onnx is not a readable ONNX model"):
        _compile(bad, tmp_path)


def test_graphs_compile_with_their_weights_as_stored(tmp_path):
    path = MODELS["pp-ocr-cls"].gguf_path()
    options = CompileOptions.resolve("llvm", "q4f32_1", source=path)
    with pytest.raises(CompileError, match="as stored"):
        compile_model(path, tmp_path / "out", options, progress=False)


def test_graph_kernels_generate_metal_code():
    """Every kernel of the classifier schedules and generates Metal code (Metal skips dlight's
    Matmul rule, whose simdgroup path crashes TVM), though no Mac here runs it."""
    artifact = ensure_compiled("pp-ocr-cls", "metal", progress=False)
    records = json.loads((artifact / "kernels_metal.json").read_text())["kernels"]
    plan = json.loads((artifact / "plan.json").read_text())
    assert set(records) == {c["kernel"] for f in plan["functions"].values() for c in f["calls"]}
    assert all(record["source"] for record in records.values())


@pytest.mark.parametrize("pad, size, relu, rules", [
    (1, 3, True, "spatial"), (1, 3, False, "spatial"), (0, 1, True, "matmul+gemv+spatial"),
])  # fmt: skip
def test_a_padded_convolution_gets_a_thread_per_output_on_gpus(tmp_path, pad, size, relu, rules):
    """A padded convolution is kept from dlight's Matmul tiles, which load the input before
    checking the padding's bounds (reading before the buffer: PoCL's OpenCL faulted on the
    detector); an unpadded one (1x1) keeps them. No output is summed by a whole workgroup."""
    from tapml.graph import OnnxGraph
    from tapml.graph_plan import build_graph_plan
    from tapml.targets import get_target
    from tapml.targets.gpu import schedule

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 64, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = helper.make_tensor("w", TensorProto.FLOAT, [32, 16, size, size],
                           np.ones(32 * 16 * size * size, np.float32))  # fmt: skip
    nodes = [helper.make_node("Conv", ["x", "w"], ["c" if relu else "y"], pads=[pad] * 4)]
    nodes += [helper.make_node("Relu", ["c"], ["y"])] if relu else []
    graph = OnnxGraph.open(_save(tmp_path, nodes, [x], [y], initializer=[w]))
    kernels, _, _ = build_graph_plan(graph, graph.entries(()), {})
    (name,) = [k for k in kernels if "conv2d" in k]
    label, _ = schedule(name, kernels[name], get_target("webgpu").tvm_target())
    assert label == rules
