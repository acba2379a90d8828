"""OCR (tapml.runtime.ocr): PP-OCRv4's three ONNX graphs from rapidocr-onnxruntime run by
onnxruntime at fixed shapes, as a compiled graph would be, reading rendered text back exactly
(fonts, sizes, two lines, upside down, vertical, a large image, width buckets, a second
detector shape); and the numpy geometry alone: components, min-area rectangles, box scores,
unclipping, DB post-processing, CTC decoding, reading order, the renderer."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tapml.runtime.ocr import OcrPipeline, ctc_decode, reading_order
from tapml.runtime.ocr_boxes import (
    box_score,
    boxes_from_map,
    convex_hull,
    dilate,
    label_components,
    min_area_rect,
    order_corners,
    unclip,
)
from tapml.runtime.text_image import DEFAULT_FONT, FONT_DIR, available_fonts, render_text

DETECTOR = "ch_PP-OCRv4_det_infer.onnx"
CLASSIFIER = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
RECOGNIZER = "ch_PP-OCRv4_rec_infer.onnx"
DET_SHAPE = (1, 3, 640, 640)
CLS_SHAPE = (1, 3, 48, 192)


def rec_shapes(*widths: int) -> list[tuple[int, ...]]:
    return [(1, 3, 48, w) for w in widths]


REC_SHAPES = rec_shapes(320, 640)  # tapml's default buckets


def model_dir() -> Path | None:
    # find_spec locates the package without importing it: its __init__ imports cv2.
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class OrtGraph:
    """An onnxruntime session standing in for a compiled graph: it takes only `shapes`, as a
    graph compiled for fixed shapes would, and records the shapes it was given."""

    def __init__(self, session, shapes: list[tuple[int, ...]]):
        self.session, self.shapes, self.calls = session, shapes, []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        assert x.dtype == np.float32 and x.shape in self.shapes, (x.dtype, x.shape, self.shapes)
        self.calls.append(x.shape)
        return self.session.run(None, {self.session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def sessions():
    ort = pytest.importorskip("onnxruntime")
    models = model_dir()
    if models is None or not (models / RECOGNIZER).is_file():
        pytest.skip(
            "the PP-OCR graphs come with rapidocr-onnxruntime: "
            "pip install --no-deps rapidocr-onnxruntime==1.4.4"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return {
        name: ort.InferenceSession(str(models / name), options, ["CPUExecutionProvider"])
        for name in (DETECTOR, CLASSIFIER, RECOGNIZER)
    }


@pytest.fixture
def make_pipeline(sessions):
    """make_pipeline(detector shapes, recognizer shapes) -> an OcrPipeline on fresh graphs."""
    meta = sessions[RECOGNIZER].get_modelmeta().custom_metadata_map
    characters = meta["character"].split("\n")

    def make(det=(DET_SHAPE,), rec=REC_SHAPES) -> OcrPipeline:
        return OcrPipeline(
            OrtGraph(sessions[DETECTOR], list(det)),
            OrtGraph(sessions[CLASSIFIER], [CLS_SHAPE]),
            OrtGraph(sessions[RECOGNIZER], list(rec)),
            characters,
        )

    return make


def font_path(name: str) -> str:
    """The font's path, skipping the test where it is not installed."""
    if name == DEFAULT_FONT:
        return name
    path = FONT_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} is not installed (fonts-dejavu-core, fonts-liberation)")
    return str(path)


def assert_box_inside(box, image: Image.Image) -> None:
    for x, y in box:
        assert 0 <= x < image.width and 0 <= y < image.height, (box, image.size)


# Each case reads back exactly with a margin of a few font sizes around it. PP-OCRv4's
# recognizer (trained mostly on Chinese) drops a narrow space between Latin words, before a
# capital or a digit most (in "Hello World 2026" under ~40 px), so smaller cases avoid those.
READ_CASES = [
    ("dejavu/DejaVuSans.ttf", 48, ["Hello World 2026", "tapml reads text"]),
    ("dejavu/DejaVuSerif.ttf", 40, ["Hello World 2026", "0123456789"]),
    ("dejavu/DejaVuSansMono.ttf", 32, ["tapml reads text", "0123456789"]),
    ("liberation/LiberationSans-Regular.ttf", 32, ["tapml reads text", "Pillow and numpy 3.14"]),
    ("liberation/LiberationSerif-Regular.ttf", 40, ["the quick brown fox", "3.14 and 2026"]),
    ("liberation/LiberationMono-Regular.ttf", 28, ["tapml reads text", "0123456789"]),
    (DEFAULT_FONT, 36, ["tapml reads text", "0123456789"]),
]


def case_ids(cases) -> list[str]:
    return [f"{Path(font).stem}-{size}" for font, size, _ in cases]


@pytest.mark.parametrize("font, size, lines", READ_CASES, ids=case_ids(READ_CASES))
def test_reads_two_lines(make_pipeline, font, size, lines):
    pipeline = make_pipeline()
    image = render_text(lines, font_path(font), size)
    read = pipeline.read(image)
    assert [line.text for line in read] == lines
    assert all(line.score > 0.8 for line in read)
    for line in read:
        assert_box_inside(line.box, image)
        (x0, y0), (x1, _), (_, y2), _ = line.box
        assert x0 < x1 and y0 < y2  # clockwise from the top-left
    assert read[0].box[3][1] <= read[1].box[0][1] + 2  # the first line above the second
    assert pipeline.detector.calls == [DET_SHAPE] and pipeline.classifier.calls == [CLS_SHAPE] * 2


UPSIDE_DOWN_CASES = [
    ("dejavu/DejaVuSerif.ttf", 44, ["Hello World 2026", "tapml reads text"]),
    ("liberation/LiberationSans-Regular.ttf", 36, ["the quick brown fox", "0123456789"]),
    (DEFAULT_FONT, 48, ["Hello World 2026", "tapml reads text"]),
]


@pytest.mark.parametrize("font, size, lines", UPSIDE_DOWN_CASES, ids=case_ids(UPSIDE_DOWN_CASES))
def test_reads_upside_down(make_pipeline, font, size, lines):
    read = make_pipeline().read(render_text(lines, font_path(font), size, rotate180=True))
    # Upside down, the last line is on top: reading order follows the image.
    assert [line.text for line in read] == lines[::-1]


@pytest.mark.parametrize("angle", [90, 270])
def test_reads_vertical_line(make_pipeline, angle):
    """A tall crop is turned a quarter; turned the wrong way, the classifier turns it back."""
    image = render_text(["tapml reads text"], font_path("dejavu/DejaVuSans.ttf"), 40)
    read = make_pipeline().read(image.rotate(angle, expand=True))
    assert [line.text for line in read] == ["tapml reads text"]


def test_boxes_in_original_pixels(make_pipeline):
    """An image larger than the detector's shape is scaled down; its box comes back in the
    image's own pixels, around the ink."""
    canvas = Image.new("RGB", (1600, 900), "white")
    canvas.paste(
        render_text(["tapml reads text"], font_path("dejavu/DejaVuSans.ttf"), 96), (500, 400)
    )
    pipeline = make_pipeline()
    (line,) = pipeline.read(canvas)
    assert line.text == "tapml reads text"
    ys, xs = np.nonzero(np.asarray(canvas.convert("L")) < 128)
    box = np.array(line.box)
    # Unclipping leaves a margin around the ink (about 8 pixels here).
    assert np.all(box.min(0) <= [xs.min(), ys.min()]) and np.all(box.max(0) >= [xs.max(), ys.max()])
    assert np.all(box.min(0) >= [xs.min() - 30, ys.min() - 30])
    assert np.all(box.max(0) <= [xs.max() + 30, ys.max() + 30])
    assert pipeline.detector.calls == [DET_SHAPE]


def test_width_buckets(make_pipeline):
    """Each line goes to the narrowest recognizer bucket that holds it at height 48; a line
    too long for the widest is squeezed into it and still read."""
    lines = ["2026", "0123456789", "Pillow and numpy 3.14 tapml reads text and more"]
    pipeline = make_pipeline(rec=rec_shapes(160, 320, 640))
    read = pipeline.read(render_text(lines, font_path("dejavu/DejaVuSans.ttf"), 32))
    assert [line.text for line in read] == lines
    assert pipeline.recognizer.calls == rec_shapes(160, 320, 640)


def test_detector_shape_that_fits_best(make_pipeline):
    """With two detector shapes, a wide image goes to the wide one (shown larger there)."""
    wide = (1, 3, 256, 1024)
    pipeline = make_pipeline(det=[DET_SHAPE, wide])
    lines = ["Pillow and numpy 3.14 tapml reads text"]
    read = pipeline.read(render_text(lines, font_path("dejavu/DejaVuSans.ttf"), 40))
    assert [line.text for line in read] == lines
    assert pipeline.detector.calls == [wide]


def test_blank_image_reads_nothing(make_pipeline):
    assert make_pipeline().read(Image.new("RGB", (300, 200), "white")) == []


def graph(*shapes):
    return SimpleNamespace(shapes=list(shapes))


@pytest.mark.parametrize(
    "det, cls, rec, message",
    [
        ((1, 3, 600, 600), CLS_SHAPE, (1, 3, 48, 320), "multiple of 32"),
        (DET_SHAPE, (6, 3, 48, 192), (1, 3, 48, 320), "one image at a time"),
        (DET_SHAPE, CLS_SHAPE, (1, 48, 320), r"\[1, 3, H, W\]"),
    ],
)
def test_rejects_shapes_it_cannot_feed(det, cls, rec, message):
    with pytest.raises(ValueError, match=message):
        OcrPipeline(graph(det), graph(cls), graph(rec), ["a"])


def test_rejects_recognizer_buckets_of_different_heights():
    rec = graph((1, 3, 48, 320), (1, 3, 32, 320))
    with pytest.raises(ValueError, match="differ in width only"):
        OcrPipeline(graph(DET_SHAPE), graph(CLS_SHAPE), rec, ["a"])


# --- geometry, decoding, rendering: numpy only ---


def rotated_rect(center, width, height, degrees):
    t = np.deg2rad(degrees)
    u, v = np.array([np.cos(t), np.sin(t)]), np.array([-np.sin(t), np.cos(t)])
    signs = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) / 2
    return np.asarray(center) + signs @ np.stack([u * width, v * height])


def same_corners(a, b, atol=1e-6):
    """Whether two sets of four corners are the same points, in any order."""
    return np.allclose(np.sort(np.round(a, 6), axis=0), np.sort(np.round(b, 6), axis=0), atol=atol)


@pytest.mark.parametrize("degrees", [0, 17, 30, 90, 135])
def test_min_area_rect_of_rotated_rectangle(degrees):
    corners = rotated_rect((100, 50), 40, 10, degrees)
    rng = np.random.default_rng(degrees)
    s, t = rng.random((2, 300))
    inside = (
        corners[0] + np.outer(s, corners[1] - corners[0]) + np.outer(t, corners[3] - corners[0])
    )
    rect, width, height = min_area_rect(np.vstack([inside, corners]))
    assert sorted([width, height]) == pytest.approx([10, 40])
    assert same_corners(rect, corners)


def test_min_area_rect_of_a_line_and_a_point():
    rect, width, height = min_area_rect(np.array([[0, 0], [3, 3], [1, 1], [2, 2]]))
    assert (width, height) == pytest.approx((np.hypot(3, 3), 0))
    assert min_area_rect(np.array([[5, 7], [5, 7]]))[1:] == (0, 0)


def test_convex_hull_drops_interior_and_collinear_points():
    square = [[0, 0], [4, 0], [4, 4], [0, 4]]
    hull = convex_hull(np.array(square + [[2, 0], [1, 1], [2, 3], [0, 2]]))
    assert same_corners(hull, np.array(square)) and len(hull) == 4


def test_label_components_joins_diagonals_and_late_merges():
    mask = np.array(
        [
            [1, 0, 0, 1, 0, 1],
            [0, 1, 0, 1, 0, 1],
            [0, 0, 0, 1, 0, 1],
            [1, 1, 0, 1, 1, 1],  # a U: its two arms meet only here
            [0, 0, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
        ],
        dtype=bool,
    )
    labels, count = label_components(mask)
    assert count == 4
    assert labels[0, 0] == labels[1, 1] != 0  # diagonal neighbours
    assert labels[0, 3] == labels[0, 5] == labels[3, 4]
    assert len({labels[0, 0], labels[3, 0], labels[0, 3], labels[5, 2]}) == 4
    assert np.array_equal(labels > 0, mask)
    assert label_components(np.zeros((3, 3), dtype=bool))[1] == 0


def test_dilate_grows_right_and_down():
    mask = np.zeros((4, 4), dtype=bool)
    mask[1, 1] = True
    expected = np.zeros((4, 4), dtype=bool)
    expected[1:3, 1:3] = True
    assert np.array_equal(dilate(mask), expected)


def test_box_score_is_the_mean_inside_the_box():
    prob = np.zeros((20, 30))
    prob[5:10, 5:25] = 1.0
    assert box_score(prob, np.array([[5, 5], [24, 5], [24, 9], [5, 9]], float)) == 1.0
    # Twice as tall: the lower half (rows 10-14) is empty.
    assert box_score(prob, np.array([[5, 5], [24, 5], [24, 14], [5, 14]], float)) == 0.5


def test_unclip_grows_each_side_by_area_ratio_over_perimeter():
    corners = rotated_rect((50, 50), 100, 10, 20)
    grown, width, height = unclip(corners, 100, 10, 1.6)
    distance = 100 * 10 * 1.6 / 220
    assert (width, height) == (pytest.approx(100 + 2 * distance), pytest.approx(10 + 2 * distance))
    assert same_corners(grown, rotated_rect((50, 50), width, height, 20))


def test_boxes_from_map_finds_each_text_region():
    prob = np.zeros((60, 120), dtype=np.float32)
    prob[10:16, 10:80] = 0.9  # a line
    prob[40:46, 30:100] = 0.8  # another
    prob[30, 5] = 0.9  # a speck, too small to be text
    prob[20:23, 90:110] = 0.4  # above the threshold, but a low box score
    boxes = boxes_from_map(prob)
    assert len(boxes) == 2
    first, second = boxes
    # The dilated component spans x 10..80, y 10..16; unclipping adds 1.6 * area / perimeter.
    distance = 70 * 6 * 1.6 / (2 * (70 + 6))
    grown = np.array([[10, 10], [80, 10], [80, 16], [10, 16]]) + distance * np.array(
        [[-1, -1], [1, -1], [1, 1], [-1, 1]]
    )
    assert np.allclose(first, grown)
    assert first[0, 1] < second[0, 1]
    assert np.array_equal(first, order_corners(first))


def test_order_corners_is_clockwise_from_top_left():
    ordered = order_corners(np.array([[10, 20], [0, 0], [10, 0], [0, 20]], float))
    assert ordered.tolist() == [[0, 0], [10, 0], [10, 20], [0, 20]]


def test_ctc_decode_merges_repeats_and_drops_blanks():
    characters = ["<blank>", "a", "b", " "]
    steps = [1, 1, 0, 1, 2, 2, 0, 0, 3, 1]  # a a - a b b - - ' ' a
    probs = np.full((len(steps), 4), 0.1)
    probs[np.arange(len(steps)), steps] = np.linspace(0.5, 0.95, len(steps))
    text, score = ctc_decode(probs, characters)
    assert text == "aab a"
    kept = [0, 3, 4, 8, 9]  # the first step of each run that is not blank
    assert score == pytest.approx(np.linspace(0.5, 0.95, len(steps))[kept].mean())
    assert ctc_decode(np.eye(4)[[0, 0, 0]], characters) == ("", 0.0)


def test_reading_order_is_top_down_then_left_right():
    def box(x, y, w=50, h=20):
        return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], float)

    boxes = [box(200, 103), box(10, 100), box(10, 200), box(120, 98)]
    assert reading_order(boxes) == [1, 3, 0, 2]


def test_render_text():
    fonts = available_fonts()
    assert fonts
    one = render_text(["tapml"], fonts[0], 32)
    two = render_text(["tapml", "reads text"], fonts[0], 32)
    assert one.mode == "RGB" and two.height > one.height and two.width > one.width
    pixels = np.asarray(two.convert("L"))
    assert pixels.min() < 64 and pixels[0].min() == 255  # black ink, a white margin
    flipped = render_text(["tapml", "reads text"], fonts[0], 32, rotate180=True)
    assert np.array_equal(np.asarray(flipped), np.asarray(two)[::-1, ::-1])


def test_render_text_falls_back_to_the_built_in_font(caplog):
    with caplog.at_level(logging.WARNING, logger="tapml"):
        image = render_text(["tapml"], "no-such-font.ttf", 32)
    assert "no-such-font.ttf" in caplog.text
    assert np.array_equal(np.asarray(image), np.asarray(render_text(["tapml"], None, 32)))
