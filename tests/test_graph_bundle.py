"""PP-OCR's orientation classifier (an ONNX graph) packaged for webgpu and android: the web
bundle's graph page in headless Chromium (WebGPU on SwiftShader) fits a rendered text image to
the graph's input as runtime/ocr.py does and gives onnxruntime's outputs for it, decodes a
recognizer's CTC output as Python does and names what it cannot read; the android bundle
packages without a tokenizer and verifies.

SwiftShader takes about 8 s per classifier run here, so the graph runs once, on an image as high
as the input and narrower (no resampling: the page's input must equal Python's); fitting larger
and smaller images is checked without running the graph. The page's screenshot is saved under
$TAPML_TEST_ARTIFACTS (or the test's tmp directory).
"""

import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from conftest import open_page
from PIL import Image, ImageOps

from tapml.api import ensure_compiled
from tapml.browser import Browser, find_chromium
from tapml.cli import main
from tapml.models import MODELS
from tapml.package import MANIFEST, package, read_manifest, runtime_web_dir, verify
from tapml.runtime.ocr import ctc_decode, normalize
from tapml.runtime.text_image import render_text

pytestmark = pytest.mark.real_model

MODEL = "pp-ocr-cls"
OUTPUT = "save_infer_model/scale_0.tmp_1"  # [1, 2]: softmax over 0 and 180 degrees
HEIGHT, WIDTH = 48, 192
RTOL = 1e-3  # of the largest output: float32 on both sides, summed in other orders


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """The classifier's webgpu and android bundles, packaged once (android by the command
    line)."""
    root = tmp_path_factory.mktemp("graph-bundles")
    artifact = ensure_compiled(MODEL, "webgpu", progress=False)
    web = package(str(artifact), "webgpu", root / "webgpu", progress=False).path
    result = CliRunner().invoke(main, ["-q", "package", MODEL, "--target", "android",
                                       "-o", str(root / "android")])  # fmt: skip
    assert result.exit_code == 0, result.output
    return {"webgpu": web, "android": Path(result.stdout.strip())}


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(str(MODELS[MODEL].gguf_path()), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def page(bundles):
    if find_chromium() is None:
        pytest.skip("no Chromium (bash scripts/setup.sh)")
    with Browser(bundles["webgpu"], timeout=300) as browser:
        open_page(browser, "index.html", "(await window.tapml.ready).stats")
        yield browser


def text_image(text: str, size: int, rotate180: bool = False) -> Image.Image:
    """A line of text in color (so that swapped channels show), upside down if asked:
    size + 16 pixels high."""
    gray = render_text([text], size=size, margin=4, rotate180=rotate180).convert("L")
    return ImageOps.colorize(gray, black="#702010", white="#f0f8d0")


def data_url(image: Image.Image) -> str:
    png = io.BytesIO()
    image.save(png, "PNG")
    return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()


def test_web_bundle_records_the_graph_and_opens_its_page(bundles):
    bundle = bundles["webgpu"]
    manifest = read_manifest(bundle)
    assert (manifest["platform"], manifest["target"]) == ("webgpu", "webgpu")
    assert manifest["task"] == {"kind": "graph", "inputs": ["x"], "outputs": [OUTPUT]}
    assert manifest["chat"] is None
    files = {f["path"] for f in manifest["files"]}
    assert {"runtime/graph.js", "runtime/executor.js", "tapml-config.json"} <= files
    assert not any(f.startswith("tokenizer/") for f in files)
    assert (bundle / "index.html").read_bytes() == (runtime_web_dir() / "graph.html").read_bytes()
    assert verify(bundle) == []


def test_page_reads_an_image_like_onnxruntime(page, session, tmp_path):
    image = text_image("Hello 42", 32, rotate180=True)
    assert image.height == HEIGHT and image.width < WIDTH  # fits as it is: no resampling
    got = page.evaluate(f"window.tapml.runImage({json.dumps(data_url(image))})")
    assert got["input"]["name"] == "x" and got["input"]["shape"] == [1, 3, HEIGHT, WIDTH]
    x = np.zeros((1, 3, HEIGHT, WIDTH), np.float32)  # zero-padded on the right
    x[0, :, :, : image.width] = normalize(image)  # BGR, [-1, 1]
    np.testing.assert_allclose(np.reshape(got["input"]["data"], x.shape), x, atol=1e-6)
    (want,) = session.run(None, {"x": x})
    output = got["outputs"][OUTPUT]
    assert list(got["outputs"]) == [OUTPUT] and output["shape"] == [1, 2]
    probs = np.asarray(output["data"], np.float32).reshape(want.shape)
    error = np.abs(probs - want).max() / np.abs(want).max()
    print(f"page vs onnxruntime: relative error {error:.1e}")
    assert error <= RTOL
    assert probs.argmax() == 1  # upside down
    shown = page.evaluate("[...document.querySelectorAll('#outputs h2, #outputs li')]"
                          ".map((e) => e.textContent)")  # fmt: skip
    assert shown == [f"{OUTPUT} [1, 2]", *(f"{p:.4f}" for p in probs.ravel())]
    assert not page.evaluate("document.getElementById('status').className")  # no error
    folder = Path(os.environ.get("TAPML_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"graph page screenshot: {page.screenshot(folder / 'graph_page.png')}")


@pytest.mark.parametrize("text, size", [("Hello 42", 28), ("Quick brown fox 42", 24)],
                         ids=["taller", "wider"])  # fmt: skip
def test_page_fits_an_image_keeping_its_aspect(page, text, size):
    """Scaled to fill the input's height (padded on the right) or its width (padded below);
    the graph does not run: fitting is all there is to check."""
    image = text_image(text, size)
    url = json.dumps(data_url(image))
    got = page.evaluate(f"""(async () => {{
        const graph = await window.tapml.ready;
        const image = await createImageBitmap(await (await fetch({url})).blob());
        return Array.from(graph.fit(image, graph.inputShape()));
    }})()""")
    x = np.asarray(got, np.float32).reshape(3, HEIGHT, WIDTH)
    scale = min(HEIGHT / image.height, WIDTH / image.width)
    width, height = round(image.width * scale), round(image.height * scale)
    assert (width == WIDTH) != (height == HEIGHT)
    assert not x[:, height:].any() and not x[:, :, width:].any()  # zeros after normalizing
    pillow = normalize(image.resize((width, height), Image.Resampling.BILINEAR))
    difference = np.abs(x[:, :height, :width] - pillow).mean()
    print(f"page vs Pillow's bilinear resize: mean |difference| {difference:.3f}")
    assert difference < 0.05  # Chromium's resampling is not Pillow's


def test_page_decodes_ctc_like_python(page):
    """A recognizer's [1, T, C] output, decoded by the page's Graph with characters from the
    ONNX metadata (no recognizer runs: it takes tens of seconds on SwiftShader)."""
    characters = ["a", "b", "c", "汉", "'"]
    classes = len(characters) + 2  # the blank, the characters, a space
    best = np.random.default_rng(0).choice(classes, size=40, p=[0.4] + [0.1] * 6)
    probs = np.full((40, classes), 0.01, np.float32)
    probs[np.arange(40), best] = 0.9
    got = page.evaluate(f"""(() => {{
        const graph = (metadata) => new window.tapml.Graph({{
            executor: {{ plan: {{ task: {{ kind: "graph", inputs: ["x"], outputs: ["y"] }} }} }},
            config: {{ model: {{ metadata }} }} }});
        const output = {{ shape: [1, 40, {classes}], data: {json.dumps(probs.ravel().tolist())} }};
        return [graph({{ character: {json.dumps(chr(10).join(characters))} }}).decode(output),
                graph({{}}).decode(output)];
    }})()""")
    text, _ = ctc_decode(probs, ["<blank>", *characters, " "])
    assert text and got[0] == {"best": best.tolist(), "text": text}
    assert got[1] == {"best": best.tolist()}  # no characters: the best class per step only


def test_page_names_what_it_cannot_read(page):
    got = page.evaluate("window.tapml.runImage('data:text/plain,hello').then(() => 'read', "
                        "(e) => e.message)")  # fmt: skip
    assert got.startswith("not an image this browser decodes"), got
    shown = page.evaluate("[document.getElementById('status').textContent, "
                          "document.getElementById('status').className]")  # fmt: skip
    assert shown == [f"error: {got}", "error"]


def test_android_bundle_packages_without_a_tokenizer_and_verifies(bundles):
    bundle = bundles["android"]
    manifest = read_manifest(bundle)
    assert (manifest["platform"], manifest["target"]) == ("android", "opencl")
    assert manifest["task"]["kind"] == "graph" and manifest["requirements"]["api"] == "opencl"
    files = {f["path"] for f in manifest["files"]}
    assert {"plan.json", "kernels_opencl.json", "weights/index.json"} <= files
    assert not any(f.startswith(("tokenizer/", "runtime/")) or f == "index.html" for f in files)
    assert MANIFEST not in files and verify(bundle) == []
    result = CliRunner().invoke(main, ["-q", "verify", str(bundle)])
    assert result.exit_code == 0 and "all intact" in result.output, result.output

