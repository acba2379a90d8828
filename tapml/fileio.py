"""Atomic file writes (a reader never sees a half-written file), and reading small files
that hold a secret."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def make_readable(path: str | Path) -> None:
    """Give a mkstemp file (created 0600) the permissions a plain open() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to `path` for a writer that wants a file name; moved on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_document(path: Path, fmt: str, version: int, error: type[Exception], remedy: str,
                  missing: str | None = None) -> dict:  # fmt: skip
    """The JSON document in `path`, which must be of format `fmt` and `version`; anything else
    raises `error` naming the file and ending with `remedy` (what the user should do).
    `missing` replaces the message for a file that does not exist."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as e:
        raise error(missing or f"{path} not found; {remedy}") from e
    except UnicodeDecodeError as e:
        raise error(f"{path} is corrupt ({e}); {remedy}") from e
    return parse_document(text, str(path), fmt, version, error, remedy)


def parse_document(text: str | bytes, where: str, fmt: str, version: int,
                   error: type[Exception], remedy: str) -> dict:  # fmt: skip
    """`read_document` for text already read (`where` names it in errors)."""
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{where} is corrupt ({e}); {remedy}") from e
    check_document(document, where, fmt, version, error, remedy)
    return document


def check_document(document: object, where: str, fmt: str, version: int,
                   error: type[Exception], remedy: str) -> None:  # fmt: skip
    """Raise `error` unless `document` is a dict of format `fmt` and `version`."""
    if not isinstance(document, dict) or document.get("format") != fmt:
        raise error(f"{where} is not a {fmt} file; {remedy}")
    if document.get("version") != version:
        raise error(f"{where} has {fmt} version {document.get('version')!r}; this tapml reads "
                    f"version {version}: {remedy}")  # fmt: skip


def read_secret(path: str | Path, what: str) -> str:
    """The secret (`what`: "token", "API key") in the file at `path`, surrounding whitespace
    dropped; a missing, unreadable or empty file is a TapmlError naming it."""
    from .errors import TapmlError

    try:
        secret = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise TapmlError(f"cannot read the {what} file {path}: {e.strerror}") from e
    if not secret:
        raise TapmlError(f"the {what} file {path} is empty")
    return secret
