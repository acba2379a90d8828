"""`tapml ocr`: the text lines of images, read by PP-OCR's three compiled graphs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tapml.targets import TARGETS

from .options import threads_option


@click.command("ocr")
@click.argument("images", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))  # fmt: skip
@click.option(
    "--target", type=click.Choice(list(TARGETS)), default="llvm", show_default=True,
    help="Where the kernels run.",
)
@threads_option
@click.option("--json", "as_json", is_flag=True,
              help='Print [{"image": ..., "lines": [{"text", "score", "box"}, ...]}, ...].')
@click.pass_obj
def command(obj, images, target, threads, as_json) -> None:
    """Print the text lines of each IMAGE (PNG, JPEG, ... anything Pillow reads), top to
    bottom: the text, then its box as four x,y corners clockwise from the top left.

    PP-OCRv4 detects the lines (on the image scaled to fit 640x640), a classifier turns
    upside-down ones, and the recognizer reads each at height 48, 320 or 640 pixels wide
    (a longer line is squeezed). The three graphs compile on first use and are cached
    (`tapml models` lists them: pp-ocrv4-det, pp-ocr-cls, pp-ocrv4-rec).

    \b
    Examples:
      tapml ocr receipt.png
      tapml ocr page1.png page2.jpg --target webgpu --json
    """
    from PIL import Image, UnidentifiedImageError

    from tapml.api import load_ocr
    from tapml.errors import TapmlError
    from tapml.targets.llvm import use_threads

    pictures = []
    for path in images:  # every image is read before anything compiles
        try:
            with Image.open(path) as image:
                pictures.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise TapmlError(f"{path} is not an image Pillow can read ({e})") from None
    use_threads(threads)  # before TVM's thread pool starts
    ocr = load_ocr(target, progress=obj["progress"])
    results = []
    for path, picture in zip(images, pictures, strict=True):
        lines = ocr.read(picture)
        results.append({"image": str(path), "lines": [
            {"text": line.text, "score": round(line.score, 4), "box": [list(p) for p in line.box]}
            for line in lines]})  # fmt: skip
    if as_json:
        click.echo(json.dumps(results, ensure_ascii=False))
        return
    for result in results:
        if len(results) > 1:
            click.echo(f"== {result['image']}")
        for line in result["lines"]:
            corners = " ".join(f"{x},{y}" for x, y in line["box"])
            click.echo(f"{line['text']}\t{corners}")
