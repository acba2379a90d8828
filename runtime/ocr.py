"""PP-OCR as rapidocr-onnxruntime 1.4.4 runs it, around three graphs of fixed input shapes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from .ocr_boxes import boxes_from_map, order_corners

Point = tuple[int, int]


class Graph(Protocol):
    """One compiled network: it accepts exactly the NCHW float32 input shapes in `shapes` (one per
    bucket) and returns its single output."""

    shapes: list[tuple[int, ...]]

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class TextLine:
    """A line read from an image: its text, the recognizer's mean confidence in the characters
    kept, and its box as four corners in the image's pixels, clockwise from top-left."""

    text: str
    score: float
    box: tuple[Point, Point, Point, Point]


def normalize(image: Image.Image) -> np.ndarray:
    """A CHW float32 array scaled to [-1, 1], channels in BGR order: PP-OCR was trained on
    OpenCV-loaded images."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)[:, :, ::-1]
    return (pixels / 255.0 - 0.5).transpose(2, 0, 1) / 0.5


def fit_width(image: Image.Image, height: int, max_width: int) -> np.ndarray:
    """The image resized to `height` keeping its aspect (squeezed to `max_width` if wider),
    normalized, and zero-padded on the right to `max_width`: the input of the classifier and
    the recognizer."""
    width = min(max_width, math.ceil(height * image.width / image.height))
    padded = np.zeros((3, height, max_width), dtype=np.float32)
    padded[:, :, :width] = normalize(image.resize((width, height), Image.Resampling.BILINEAR))
    return padded


def ctc_decode(probs: np.ndarray, characters: list[str]) -> tuple[str, float]:
    """(text, score) of a [steps, classes] CTC output: the best class per step, repeats merged
    and blanks (class 0) dropped; the score is the mean probability of the characters kept (0
    for an empty text). `characters[k]` is the text of class k (`characters[0]` the blank)."""
    best = probs.argmax(axis=1)
    keep = np.ones(len(best), dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    keep &= best != 0
    if not keep.any():
        return "", 0.0
    text = "".join(characters[k] for k in best[keep])
    return text, float(probs.max(axis=1)[keep].mean())


def crop_line(image: Image.Image, box: np.ndarray) -> Image.Image:
    """The box's pixels as an upright rectangle; a crop at least 1.5 times as tall as wide is
    taken for vertical text and turned a quarter counter-clockwise, as rapidocr does."""
    width = max(1, int(max(np.linalg.norm(box[0] - box[1]), np.linalg.norm(box[2] - box[3]))))
    height = max(1, int(max(np.linalg.norm(box[0] - box[3]), np.linalg.norm(box[1] - box[2]))))
    # Pillow's QUAD takes upper-left, lower-left, lower-right, upper-right, in continuous
    # coordinates where pixel (i, j) spans [i, i+1): box corners are pixel centres, hence + 0.5.
    quad = (box[[0, 3, 2, 1]] + 0.5).ravel().tolist()
    crop = image.transform((width, height), Image.Transform.QUAD, quad, Image.Resampling.BICUBIC)
    if crop.height >= 1.5 * crop.width:
        crop = crop.transpose(Image.Transpose.ROTATE_90)
    return crop


def reading_order(boxes: list[np.ndarray]) -> list[int]:
    """Indices of `boxes` top to bottom, then left to right among boxes on the same line (tops
    closer than half the shorter box's height)."""
    order = sorted(range(len(boxes)), key=lambda i: (boxes[i][0, 1], boxes[i][0, 0]))

    def height(i: int) -> float:
        return float(np.linalg.norm(boxes[i][3] - boxes[i][0]))

    # One pass of insertion: move each box left past same-line boxes that start right of it.
    for n in range(1, len(order)):
        k = n
        while k > 0:
            a, b = boxes[order[k - 1]], boxes[order[k]]
            same_line = abs(a[0, 1] - b[0, 1]) < min(height(order[k - 1]), height(order[k])) / 2
            if not (same_line and b[0, 0] < a[0, 0]):
                break
            order[k - 1], order[k] = order[k], order[k - 1]
            k -= 1
    return order


def _check_shapes(name: str, graph: Graph) -> list[tuple[int, int]]:
    """The (height, width) of each input shape `graph` accepts, after checking they are
    [1, 3, H, W]: batches of one BGR image."""
    if not graph.shapes:
        raise ValueError(f"the {name} accepts no input shape; give it at least one [1, 3, H, W]")
    sizes = []
    for shape in graph.shapes:
        if len(shape) != 4 or shape[0] != 1 or shape[1] != 3:
            raise ValueError(
                f"the {name} accepts input shape {tuple(shape)}; the pipeline feeds one image at "
                "a time, so compile it for [1, 3, H, W]"
            )
        sizes.append((int(shape[2]), int(shape[3])))
    return sizes


class OcrPipeline:
    """Reads the text lines of an image with PP-OCR's three networks, each compiled for fixed
    input shapes: the image is scaled to fit the detector's shape (aspect kept, zero-padded),
    each detected box is cropped upright, turned if the classifier finds it upside down, and
    read by the recognizer at the narrowest width bucket that holds it.

    `characters` is the recognizer's character list (its ONNX `character` metadata, one per
    line); CTC adds the blank before it and a space after it. The thresholds are rapidocr's:
    `thresh` binarizes the detector's map, `box_thresh` is the least mean probability in a box,
    `unclip_ratio` how far a box grows back around its text, `flip_thresh` how sure the
    classifier must be to turn a line, `text_score` the least recognizer score a line keeps.
    """

    def __init__(
        self,
        detector: Graph,
        classifier: Graph,
        recognizer: Graph,
        characters: list[str],
        *,
        thresh: float = 0.3,
        box_thresh: float = 0.5,
        unclip_ratio: float = 1.6,
        flip_thresh: float = 0.9,
        text_score: float = 0.5,
    ):
        self.detector, self.classifier, self.recognizer = detector, classifier, recognizer
        self.detector_sizes = _check_shapes("detector", detector)
        if any(h % 32 or w % 32 for h, w in self.detector_sizes):
            raise ValueError(
                f"the detector accepts {detector.shapes}; DB downsamples by 32 and upsamples "
                "back, so each height and width must be a multiple of 32 (e.g. 640x640)"
            )
        self.classifier_size = _check_shapes("classifier", classifier)[0]  # PP-OCR's: 48x192
        rec_sizes = _check_shapes("recognizer", recognizer)
        if len({h for h, _ in rec_sizes}) != 1:
            raise ValueError(
                f"the recognizer's buckets have heights {sorted({h for h, _ in rec_sizes})}; "
                "its buckets differ in width only (PP-OCRv4 reads lines 48 pixels high)"
            )
        self.rec_height = rec_sizes[0][0]
        self.rec_widths = sorted(w for _, w in rec_sizes)
        self.characters = ["<blank>", *characters, " "]
        self.thresh, self.box_thresh, self.unclip_ratio = thresh, box_thresh, unclip_ratio
        self.flip_thresh, self.text_score = flip_thresh, text_score

    def read(self, image: Image.Image) -> list[TextLine]:
        """The image's text lines in reading order (top to bottom, then left to right), those
        read with a score under `text_score` left out."""
        image = image.convert("RGB")
        lines = []
        for box in self.detect(image):
            crop = self.orient(crop_line(image, box))
            text, score = self.recognize(crop)
            if score >= self.text_score:
                corners = tuple((int(x), int(y)) for x, y in box)
                lines.append(TextLine(text, score, corners))
        return lines

    def detect(self, image: Image.Image) -> list[np.ndarray]:
        """Text boxes (4x2 float, clockwise from top-left) in the image's pixels, in reading
        order; boxes at most 3 pixels across are dropped."""
        # The detector shape that shows the image largest (the most detail), then the smallest.
        height, width = min(
            self.detector_sizes,
            key=lambda s: (-min(s[0] / image.height, s[1] / image.width), s[0] * s[1]),
        )
        scale = min(height / image.height, width / image.width)
        fit_w = max(1, min(width, round(image.width * scale)))
        fit_h = max(1, min(height, round(image.height * scale)))
        x = np.zeros((1, 3, height, width), dtype=np.float32)
        x[0, :, :fit_h, :fit_w] = normalize(image.resize((fit_w, fit_h), Image.Resampling.BILINEAR))
        prob = np.asarray(self.detector(x), dtype=np.float32).reshape(height, width)
        # Only the image's part of the map: boxes reaching into the padding would map back
        # past the image's edge.
        boxes = boxes_from_map(
            prob[:fit_h, :fit_w], self.thresh, self.box_thresh, self.unclip_ratio
        )
        kept = []
        for box in boxes:
            # Back to the image's pixels, rounded and kept inside it as rapidocr does.
            box = order_corners(np.round(box * [image.width / fit_w, image.height / fit_h]))
            box = np.clip(box, 0, [image.width - 1, image.height - 1])
            if min(np.linalg.norm(box[0] - box[1]), np.linalg.norm(box[0] - box[3])) > 3:
                kept.append(box)
        return [kept[i] for i in reading_order(kept)]

    def orient(self, crop: Image.Image) -> Image.Image:
        """The crop turned 180 degrees when the classifier is sure (over `flip_thresh`) that
        it is upside down."""
        height, width = self.classifier_size
        probs = np.asarray(self.classifier(fit_width(crop, height, width)[None])).reshape(-1)
        if int(probs.argmax()) == 1 and probs[1] > self.flip_thresh:
            return crop.transpose(Image.Transpose.ROTATE_180)
        return crop

    def recognize(self, crop: Image.Image) -> tuple[str, float]:
        """(text, score) of one upright line: resized to the recognizer's height, padded to the
        narrowest bucket that holds it (squeezed into the widest when none does)."""
        needed = math.ceil(self.rec_height * crop.width / crop.height)
        width = next((w for w in self.rec_widths if w >= needed), self.rec_widths[-1])
        out = np.asarray(self.recognizer(fit_width(crop, self.rec_height, width)[None]))
        return ctc_decode(out.reshape(-1, out.shape[-1]), self.characters)
