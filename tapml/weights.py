"""The weight shard format: tensors packed into `params_shard_{i}.bin` files plus `index.json`."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from .errors import WeightsError
from .fileio import make_readable, write_atomic

FORMAT = "tapml-weights"
VERSION = 1
INDEX = "index.json"
DTYPES = ("float32", "float16", "uint32", "int32", "uint8", "int8")
# Offsets are multiples of this so the arrays np.frombuffer returns are aligned.
ALIGN = 16


def shard_name(i: int) -> str:
    return f"params_shard_{i}.bin"


class _ShardWriter:
    """One shard being written to a temp file, hashed as it goes."""

    def __init__(self, directory: Path, index: int):
        self.directory = directory
        self.name = shard_name(index)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.name}.", suffix=".tmp")
        self.tmp = Path(tmp)
        self.file: BinaryIO = os.fdopen(fd, "wb")
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def pad_to(self, offset: int) -> None:
        self._write(b"\0" * (offset - self.nbytes))

    def _write(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.nbytes += len(data)

    def add(self, array: np.ndarray) -> int:
        offset = _aligned(self.nbytes)
        self.pad_to(offset)
        self._write(array.reshape(-1).view(np.uint8).data)
        return offset

    def finish(self) -> dict[str, Any]:
        self.file.close()
        make_readable(self.tmp)
        os.replace(self.tmp, self.directory / self.name)
        return {"file": self.name, "nbytes": self.nbytes, "sha256": self.sha.hexdigest()}

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _prepare(name: str, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.name not in DTYPES:
        raise ValueError(
            f"tensor {name!r} has dtype {array.dtype}; supported dtypes: {', '.join(DTYPES)}"
        )
    # The format is little-endian whatever the machine; reshape keeps a 0-d tensor's shape
    # (ascontiguousarray makes it 1-d).
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(array.shape)


def save_shards(
    arrays: Iterable[tuple[str, np.ndarray]],
    directory: Path,
    shard_bytes: int = 32 * 2**20,
    progress: bool = False,
) -> dict[str, Any]:
    """Write (name, array) pairs as shards plus index.json into directory; return the index.

    Tensors are packed in order and never straddle shards; one larger than shard_bytes gets
    a shard of its own. Only one shard is open at a time, so `arrays` may be a lazy
    iterator over weights that do not fit in memory together. Every file is written under a
    temp name and renamed into place, index.json last: a directory with an index is complete.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Drop the old index first so a crash part-way never leaves it pointing at new shards.
    (directory / INDEX).unlink(missing_ok=True)

    shards: list[dict[str, Any]] = []
    tensors: list[dict[str, Any]] = []
    seen: set[str] = set()
    writer: _ShardWriter | None = None
    bar = tqdm(
        desc="Writing weights", unit="B", unit_scale=True, file=sys.stderr, disable=not progress
    )
    try:
        for name, array in arrays:
            if name in seen:
                raise ValueError(f"tensor {name!r} appears twice")
            seen.add(name)
            array = _prepare(name, array)
            if writer is not None and _aligned(writer.nbytes) + array.nbytes > shard_bytes:
                shards.append(writer.finish())
                writer = None
            if writer is None:
                writer = _ShardWriter(directory, len(shards))
            offset = writer.add(array)
            tensors.append(
                {
                    "name": name,
                    "shape": list(array.shape),
                    "dtype": array.dtype.name,
                    "shard": len(shards),
                    "offset": offset,
                    "nbytes": array.nbytes,
                }
            )
            bar.update(array.nbytes)
        if writer is not None:
            shards.append(writer.finish())
            writer = None
    finally:
        if writer is not None:
            writer.abort()
        bar.close()

    # Shards left over from an earlier, larger save in the same directory.
    for path in directory.glob("params_shard_*.bin"):
        if path.name not in {s["file"] for s in shards}:
            path.unlink()

    index = {"format": FORMAT, "version": VERSION, "shards": shards, "tensors": tensors}
    write_atomic(directory / INDEX, json.dumps(index, indent=1).encode())
    return index


def _fix(directory: Path) -> str:
    return f"delete {directory} and compile the model again"


def read_index(directory: Path) -> dict[str, Any]:
    """The index.json in `directory`, with its `shards` and `tensors`; WeightsError if it is
    missing or malformed."""
    index_path = Path(directory) / INDEX
    if not index_path.is_file():
        raise WeightsError(f"{index_path} not found: the weights are missing or were not saved "
                           f"completely; {_fix(directory)}")  # fmt: skip
    try:
        index = json.loads(index_path.read_text())
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise ValueError(
                f"format {index.get('format')!r} version {index.get('version')!r}, "
                f"expected {FORMAT!r} version {VERSION}"
            )
        if not isinstance(index["shards"], list) or not isinstance(index["tensors"], list):
            raise ValueError("no shard and tensor lists")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise WeightsError(f"{index_path} is not a valid tapml weights index ({e}); "
                           f"{_fix(directory)}") from e  # fmt: skip
    return index


def load_shards(directory: Path, verify: bool = True) -> dict[str, np.ndarray]:
    """Read the tensors saved by save_shards as read-only arrays, checking every shard.

    Raises WeightsError for a missing or malformed index, a missing or truncated shard, or
    (when verify is true) a shard whose sha256 differs from the index.
    """
    directory = Path(directory)
    fix = _fix(directory)
    index_path = directory / INDEX
    index = read_index(directory)
    shards: list[bytes] = []
    for shard in index["shards"]:
        path = directory / shard["file"]
        if not path.is_file():
            raise WeightsError(f"weight shard {path} is missing; {fix}")
        size = path.stat().st_size
        if size != shard["nbytes"]:
            raise WeightsError(
                f"weight shard {path} has {size} bytes, index.json expects {shard['nbytes']} "
                f"(truncated or overwritten); {fix}"
            )
        data = path.read_bytes()
        if verify and hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise WeightsError(f"weight shard {path} fails its sha256 check (corrupted); {fix}")
        shards.append(data)

    out: dict[str, np.ndarray] = {}
    for t in index["tensors"]:
        dtype = np.dtype(t["dtype"]).newbyteorder("<")
        count = t["nbytes"] // dtype.itemsize
        if t["shard"] >= len(shards) or t["offset"] + t["nbytes"] > len(shards[t["shard"]]):
            raise WeightsError(f"{index_path} places {t['name']!r} outside its shard; {fix}")
        data = shards[t["shard"]]
        out[t["name"]] = np.frombuffer(data, dtype, count, t["offset"]).reshape(t["shape"])
    return out
