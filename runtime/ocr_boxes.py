"""Text boxes from a DB probability map, in numpy: components, min-area rectangles, scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Runs:
    """A binary map as horizontal runs of set pixels, each with its 8-connected component.

    Run i covers columns `start[i]` to `stop[i] - 1` of row `row[i]`; runs are in raster
    order and `label[i]` (1..count) numbers components in the order their first run appears.
    """

    row: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    label: np.ndarray
    count: int


def label_runs(mask: np.ndarray) -> Runs:
    """The 8-connected components of `mask` as labelled runs.

    Run-length labelling keeps the Python-level work proportional to the number of runs (a few
    per text line and row) rather than to the pixels of a 640x640 map: runs come from one
    vectorized diff, and runs on adjacent rows that touch (diagonals included) are joined in
    a small union-find.
    """
    mask = np.asarray(mask, dtype=bool)
    width = mask.shape[1]
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    row, start = np.nonzero(edges == 1)
    _, stop = np.nonzero(edges == -1)  # same rows, same order: every run starts and stops
    # Sort keys that never collide across rows: position = row * stride + column.
    stride = width + 2
    first_stop = np.searchsorted(stop + row * stride, (row - 1) * stride + start)
    last_start = np.searchsorted(start + row * stride, (row - 1) * stride + stop, "right") - 1
    parent = list(range(len(row)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    # Runs first_stop[i]..last_start[i] lie on the row above run i and touch it, diagonally
    # included (their stop >= its start, their start <= its stop; stops are exclusive).
    for i in np.nonzero(first_stop <= last_start)[0]:
        for j in range(first_stop[i], last_start[i] + 1):
            a, b = root(int(i)), root(int(j))
            parent[max(a, b)] = min(a, b)
    roots = np.array([root(i) for i in range(len(row))], dtype=np.int64)
    # Roots are the first run of each component (union keeps the smaller index): renumber 1..n.
    is_root = roots == np.arange(len(row))
    number = np.cumsum(is_root)
    return Runs(row, start, stop, number[roots].astype(np.int32), int(is_root.sum()))


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(labels, count): each pixel's 8-connected component 1..count, 0 where `mask` is unset."""
    runs = label_runs(mask)
    labels = np.zeros(np.shape(mask), dtype=np.int32)
    for r, a, b, k in zip(runs.row, runs.start, runs.stop, runs.label, strict=True):
        labels[r, a:b] = k
    return labels, runs.count


def component_points(runs: Runs) -> list[np.ndarray]:
    """Per component, the (x, y) pixel centres of its runs' ends: the same convex hull as all of
    its pixels at a fraction of the points."""
    if runs.count == 0:
        return []
    ends = np.concatenate(
        [np.stack([runs.start, runs.row], 1), np.stack([runs.stop - 1, runs.row], 1)]
    ).astype(np.float64)
    labels = np.concatenate([runs.label, runs.label])
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(1, runs.count + 1))
    return np.split(ends[order], bounds[1:])


def dilate(mask: np.ndarray) -> np.ndarray:
    """`mask` dilated by a 2x2 square anchored at its bottom-right, as DB post-processing
    does (OpenCV's anchor for an even kernel): each set pixel also sets its right, lower and
    lower-right neighbours, joining strokes that the threshold left one pixel apart."""
    out = np.array(mask, dtype=bool)
    out[1:, :] |= mask[:-1, :]
    out[:, 1:] |= mask[:, :-1]
    out[1:, 1:] |= mask[:-1, :-1]
    return out


def convex_hull(points: np.ndarray) -> np.ndarray:
    """The convex hull of (x, y) points, counter-clockwise in a y-up frame (Andrew's monotone
    chain); collinear points are dropped, so a line of points gives its two ends."""
    pts = np.unique(np.asarray(points, dtype=np.float64), axis=0)  # sorted by x, then y
    if len(pts) < 3:
        return pts

    def half(sequence: np.ndarray) -> list[np.ndarray]:
        chain: list[np.ndarray] = []
        for p in sequence:
            while len(chain) >= 2:
                (ax, ay), (bx, by) = chain[-2], chain[-1]
                if (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax) > 0:
                    break
                chain.pop()
            chain.append(p)
        return chain

    lower, upper = half(pts), half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1])


def min_area_rect(points: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(corners, width, height): the smallest rotated rectangle around `points`.

    The minimum-area rectangle has a side on an edge of the convex hull (rotating calipers),
    so each hull edge's direction is tried with all hull points projected on it. Corners go
    round the rectangle in order; `width` runs along the first edge (corners 0 to 1).
    """
    hull = convex_hull(points)
    if len(hull) == 1:
        return np.repeat(hull, 4, axis=0), 0.0, 0.0
    edges = np.roll(hull, -1, axis=0) - hull
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    keep = lengths > 0
    u = edges[keep] / lengths[keep, None]  # one unit direction per hull edge
    v = np.stack([-u[:, 1], u[:, 0]], 1)
    along, across = u @ hull.T, v @ hull.T  # (edges, points) projections
    areas = np.ptp(along, axis=1) * np.ptp(across, axis=1)
    best = int(np.argmin(areas))
    a0, a1 = along[best].min(), along[best].max()
    c0, c1 = across[best].min(), across[best].max()
    corners = np.array([[a0, c0], [a1, c0], [a1, c1], [a0, c1]]) @ np.stack([u[best], v[best]])
    return corners, float(a1 - a0), float(c1 - c0)


def order_corners(corners: np.ndarray) -> np.ndarray:
    """A rectangle's corners as top-left, top-right, bottom-right, bottom-left (clockwise on
    screen): the two leftmost are the left side, each side's upper point comes first."""
    pts = np.asarray(corners, dtype=np.float64)
    by_x = pts[np.argsort(pts[:, 0], kind="stable")]
    left = by_x[:2][np.argsort(by_x[:2, 1], kind="stable")]
    right = by_x[2:][np.argsort(by_x[2:, 1], kind="stable")]
    return np.array([left[0], right[0], right[1], left[1]])


def box_score(prob: np.ndarray, box: np.ndarray) -> float:
    """The mean probability over the pixels whose centres lie in the convex quadrilateral `box`
    (DB's 'fast' score: the rectangle, not the component's exact outline)."""
    height, width = prob.shape
    x0, y0 = np.clip(np.floor(box.min(0)).astype(int), 0, [width - 1, height - 1])
    x1, y1 = np.clip(np.ceil(box.max(0)).astype(int), 0, [width - 1, height - 1])
    ys, xs = np.mgrid[y0 : y1 + 1, x0 : x1 + 1]
    # The box is convex: a pixel is inside when it is on the same side of every edge.
    signs = np.stack(
        [
            (bx - ax) * (ys - ay) - (by - ay) * (xs - ax)
            for (ax, ay), (bx, by) in zip(box, np.roll(box, -1, axis=0), strict=True)
        ]
    )
    inside = np.all(signs >= -1e-6, axis=0) | np.all(signs <= 1e-6, axis=0)
    if not inside.any():
        return 0.0
    return float(prob[y0 : y1 + 1, x0 : x1 + 1][inside].mean())


def unclip(
    corners: np.ndarray, width: float, height: float, ratio: float
) -> tuple[np.ndarray, float, float]:
    """(corners, width, height) of the rectangle grown on every side by area * ratio / perimeter.

    DB's map covers a shrunk text kernel; PP-OCR grows the polygon back by that distance with
    round joins (pyclipper) and takes the min-area rectangle of the result. For a rectangle
    that rectangle is the original with each side pushed out by the distance, computed here
    directly.
    """
    if width <= 0 or height <= 0:
        return corners, width, height
    distance = width * height * ratio / (2 * (width + height))
    center = corners.mean(0)
    u = (corners[1] - corners[0]) / width
    v = (corners[3] - corners[0]) / height
    half_w, half_h = width / 2 + distance, height / 2 + distance
    grown = center + np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) @ np.stack(
        [u * half_w, v * half_h]
    )
    return grown, 2 * half_w, 2 * half_h


def boxes_from_map(
    prob: np.ndarray,
    thresh: float = 0.3,
    box_thresh: float = 0.5,
    unclip_ratio: float = 1.6,
    min_size: float = 3,
    max_candidates: int = 1000,
) -> list[np.ndarray]:
    """DB post-processing: text boxes (4x2, corners clockwise from top-left) in map pixels.

    The map is thresholded and dilated; each connected component's min-area rectangle must be
    at least `min_size` across and score at least `box_thresh`; it is then unclipped and must
    be at least `min_size + 2` across.
    """
    runs = label_runs(dilate(prob > thresh))
    boxes = []
    for points in component_points(runs)[:max_candidates]:
        rect, width, height = min_area_rect(points)
        if min(width, height) < min_size or box_score(prob, order_corners(rect)) < box_thresh:
            continue
        grown, width, height = unclip(rect, width, height, unclip_ratio)
        if min(width, height) < min_size + 2:
            continue
        boxes.append(order_corners(grown))
    return boxes
