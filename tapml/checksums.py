"""File checksums: sha256s hashed once per version of a file, and files checked against a list
of sizes and sha256s (an artifact's checksums.json, a bundle's bundle.json).

A file's sha256 is remembered with its stamp (size, mtime_ns, inode) in `stamps.json` under the
cache root, so a file unchanged since it was hashed is not read again, and one that changed
(rewritten, replaced, truncated) is hashed anew. The store is only a cache: when it cannot be
read or written (a read-only cache root), files are hashed again next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .fileio import write_atomic

log = logging.getLogger("tapml")

STAMPS_FILE = "stamps.json"
STAMPS_FORMAT, STAMPS_VERSION = "tapml-stamps", 1
CHUNK = 1 << 20


def file_sha256(path: Path, advance: Callable[[int], Any] = lambda n: None) -> str:
    """The sha256 of the file at `path`, read in blocks; `advance` is told each block's size."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
            advance(len(block))
    return digest.hexdigest()


def remembered_sha256(path: Path, advance: Callable[[int], Any] = lambda n: None) -> str:
    """The sha256 of the file at `path`: the one remembered for it while its stamp is unchanged,
    else hashed now (`advance` as in `file_sha256`) and remembered."""
    path = Path(path)
    stamp = _stamp(path)
    known = _remembered(path, stamp)
    if known is not None:
        return known
    digest = file_sha256(path, advance)
    if _stamp(path) == stamp:  # unchanged while it was read
        _remember(path, stamp, digest)
    return digest


def remembered(path: Path) -> str | None:
    """The sha256 remembered for the file at `path` as it is now, else None (never hashes)."""
    return _remembered(Path(path), _stamp(Path(path)))


def _remembered(path: Path, stamp: list[int]) -> str | None:
    entry = _read_store().get(_key(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry.get("sha256")
    return None


def remember(path: Path, sha256: str) -> None:
    """Remember `sha256` for the file at `path` as it is now (a hash taken while writing it)."""
    _remember(Path(path), _stamp(Path(path)), sha256)


def listed_files(document: dict[str, Any], where: str, error: type[Exception],
                 remedy: str) -> list[dict[str, Any]]:  # fmt: skip
    """The `files` of a document that lists files (`{"path", "nbytes", "sha256"}` each); else
    `error` naming `where` and ending with `remedy`."""
    files = document.get("files")
    if not isinstance(files, list) or not all(
        isinstance(f, dict) and {"path", "nbytes", "sha256"} <= f.keys() for f in files
    ):
        raise error(f"{where} has no valid file list; {remedy}")
    return files


def check_files(directory: Path, files: list[dict[str, Any]], listing: str,
                remembered: bool = False, progress: bool = False) -> list[str]:  # fmt: skip
    """Every problem with `files` (`{"path", "nbytes", "sha256"}`, paths relative to
    `directory`, as `listing` lists them): missing, of another size, or failing its sha256, each
    named by its path; empty when all are intact. `remembered`: a file unchanged since it was
    last hashed is not read again (`remembered_sha256`)."""
    from tqdm import tqdm

    directory = Path(directory)
    problems, present = [], []
    for f in files:
        path = directory / f["path"]
        if not path.is_file():
            problems.append(f"{f['path']}: missing")
        elif (size := path.stat().st_size) != f["nbytes"]:
            how = "truncated" if size < f["nbytes"] else "overwritten"
            problems.append(f"{f['path']}: {size} bytes, {listing} expects {f['nbytes']} ({how})")
        else:
            present.append(f)
    sha256 = remembered_sha256 if remembered else file_sha256
    with tqdm(total=sum(f["nbytes"] for f in present), desc="Verifying", unit="B",
              unit_scale=True, file=sys.stderr, disable=not progress) as bar:  # fmt: skip
        for f in present:
            if sha256(directory / f["path"], bar.update) != f["sha256"]:
                problems.append(f"{f['path']}: fails its sha256 check (corrupted)")
    return problems


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _key(path: Path) -> str:
    return str(path.resolve())


def _store_path() -> Path:
    from .cache import cache_root  # tapml.cache hashes GGUFs through this module

    return cache_root() / STAMPS_FILE


def _read_store() -> dict[str, Any]:
    """Remembered files: resolved path -> {"stamp", "sha256"}."""
    try:
        document = json.loads(_store_path().read_text())
    except (OSError, ValueError):
        return {}
    if (
        not isinstance(document, dict)
        or (document.get("format"), document.get("version")) != (STAMPS_FORMAT, STAMPS_VERSION)
        or not isinstance(document.get("files"), dict)
    ):
        return {}
    return document["files"]


def _remember(path: Path, stamp: list[int], sha256: str) -> None:
    # Read, change, write: of two processes writing at once one's entries are lost, which only
    # costs hashing those files again. Files that are gone are dropped.
    files = {p: e for p, e in _read_store().items() if os.path.exists(p)}
    files[_key(path)] = {"stamp": stamp, "sha256": sha256}
    document = {"format": STAMPS_FORMAT, "version": STAMPS_VERSION, "files": files}
    try:
        write_atomic(_store_path(), json.dumps(document).encode())
    except OSError as e:
        log.debug("cannot remember the sha256 of %s in %s: %s", path, _store_path(), e)
