"""Images of known text, black on white, to test OCR without image files."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger("tapml")

DEFAULT_FONT = "default"  # Pillow's built-in scalable font (Aileron), on every machine
FONT_DIR = Path("/usr/share/fonts/truetype")
# Common faces on Linux (Debian's fonts-dejavu-core and fonts-liberation), a sans, a serif and a
# monospace each, so tests see different letter shapes.
KNOWN_FONTS = (
    "dejavu/DejaVuSans.ttf",
    "dejavu/DejaVuSerif.ttf",
    "dejavu/DejaVuSansMono.ttf",
    "liberation/LiberationSans-Regular.ttf",
    "liberation/LiberationSerif-Regular.ttf",
    "liberation/LiberationMono-Regular.ttf",
)


def available_fonts() -> list[str]:
    """Paths of the known TrueType fonts installed here, or [DEFAULT_FONT] when none is."""
    found = [str(FONT_DIR / name) for name in KNOWN_FONTS if (FONT_DIR / name).is_file()]
    return found or [DEFAULT_FONT]


def load_font(font: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The TrueType font at path `font`, or by file name (Pillow searches the system's font
    folders), at `size` pixels; Pillow's built-in font for None, DEFAULT_FONT, or a font that
    cannot be found (with a warning)."""
    if font is not None and font != DEFAULT_FONT:
        try:
            return ImageFont.truetype(font, size)
        except OSError:
            log.warning("font %r not found; using Pillow's built-in font", font)
    return ImageFont.load_default(size)


def render_text(
    lines: list[str],
    font: str | None = None,
    size: int = 32,
    rotate180: bool = False,
    margin: int | None = None,
    line_spacing: float = 0.5,
) -> Image.Image:
    """An RGB image of `lines`, black on white, one below the other, left-aligned.

    `margin` (default: `size`) keeps white space around the text, as a scan or a screenshot
    has; `line_spacing` is the gap between lines as a fraction of `size`; `rotate180` turns
    the whole image upside down.
    """
    face = load_font(font, size)
    ascent, descent = face.getmetrics()
    margin = size if margin is None else margin
    gap = round(size * line_spacing)
    widths = [round(face.getlength(line)) for line in lines]
    width = max(widths, default=0) + 2 * margin
    height = len(lines) * (ascent + descent) + max(0, len(lines) - 1) * gap + 2 * margin
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * (ascent + descent + gap)), line, fill="black", font=face)
    return image.transpose(Image.Transpose.ROTATE_180) if rotate180 else image
