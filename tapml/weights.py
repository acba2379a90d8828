"""The weight shard format: tensors packed into `params_shard_{i}.bin` files plus `index.json`."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
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
# what the kernels assume of a buffer's address: a mapped tensor at an offset that is a
# multiple of it runs in place (shards written before they were mapped have 16, and such
# tensors are read into memory)
KERNEL_ALIGN = 64
ALIGN = KERNEL_ALIGN  # of the offsets this writer gives tensors


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
        from .checksums import remember

        self.file.close()
        make_readable(self.tmp)
        os.replace(self.tmp, self.directory / self.name)
        remember(self.directory / self.name, self.sha.hexdigest())  # its first load skips hashing
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


def load_shards(directory: Path, verify: bool = True) -> WeightShards:
    """The tensors saved by save_shards, as read-only arrays over the mapped shards, every
    shard checked now (see `WeightShards`)."""
    shards = WeightShards(directory, verify)
    shards.check()
    return shards


class WeightShards(Mapping[str, np.ndarray]):
    """A weights directory opened for reading: name -> read-only array, each a view of its
    memory-mapped shard (nothing is read until used).

    Opening checks the index, that every shard is there at its size, and, when `verify`, each
    shard's sha256 that is remembered for the file as it is now (tapml.checksums): a shard is
    hashed once per version of the file, not at every load. One not hashed yet is hashed when
    first used: by `check`, on indexing, or as `read_into` reads it. WeightsError names the
    shard that is missing, truncated or corrupted.
    """

    def __init__(self, directory: Path, verify: bool = True):
        from .checksums import remembered

        self.directory = Path(directory)
        self._fix = _fix(self.directory)
        index = read_index(self.directory)
        self._shards = index["shards"]
        self._tensors = {t["name"]: t for t in index["tensors"]}
        self._unchecked: set[int] = set()
        for i, shard in enumerate(self._shards):
            path = self._path(i)
            if not path.is_file():
                raise WeightsError(f"weight shard {path} is missing; {self._fix}")
            if (size := path.stat().st_size) != shard["nbytes"]:
                raise WeightsError(
                    f"weight shard {path} has {size} bytes, index.json expects "
                    f"{shard['nbytes']} (truncated or overwritten); {self._fix}"
                )
            if verify:
                known = remembered(path)
                if known is None:
                    self._unchecked.add(i)
                elif known != shard["sha256"]:
                    self._corrupted(i)
        for t in self._tensors.values():
            if t["shard"] >= len(self._shards) or t["offset"] + t["nbytes"] > \
                    self._shards[t["shard"]]["nbytes"]:  # fmt: skip
                raise WeightsError(f"{self.directory / INDEX} places {t['name']!r} outside its "
                                   f"shard; {self._fix}")  # fmt: skip
        self._maps: dict[tuple[int, int], mmap.mmap] = {}  # by (shard, access)
        self.bytes_read = 0  # by read_into and by hashing shards

    def _path(self, shard: int) -> Path:
        return self.directory / self._shards[shard]["file"]

    def _corrupted(self, shard: int) -> None:
        raise WeightsError(f"weight shard {self._path(shard)} fails its sha256 check "
                           f"(corrupted); {self._fix}")  # fmt: skip

    def _checked(self, shard: int, sha256: str) -> None:
        from .checksums import remember

        if sha256 != self._shards[shard]["sha256"]:
            self._corrupted(shard)
        remember(self._path(shard), sha256)
        self._unchecked.discard(shard)

    def check(self) -> None:
        """Hash every shard whose sha256 is not remembered yet."""
        from .checksums import file_sha256

        for shard in sorted(self._unchecked):
            self._checked(shard, file_sha256(self._path(shard)))
            self.bytes_read += self._shards[shard]["nbytes"]

    # -- Mapping ----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> np.ndarray:
        return self._view(name, mmap.ACCESS_READ)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def mapped(self, name: str) -> np.ndarray | None:
        """The tensor as a writable view of its shard mapped copy-on-write (kernels read it in
        place: the page cache's copy is the only one), its shard checked first; None where its
        offset does not meet the kernels' alignment."""
        if self._tensors[name]["offset"] % KERNEL_ALIGN:
            return None
        return self._view(name, mmap.ACCESS_COPY)

    def _view(self, name: str, access: int) -> np.ndarray:
        """The tensor over its shard mapped with `access` (one mapping per shard and access)."""
        t = self._tensors[name]
        if t["shard"] in self._unchecked:
            self.check()
        key = (t["shard"], access)
        if key not in self._maps:
            with open(self._path(t["shard"]), "rb") as f:
                self._maps[key] = mmap.mmap(f.fileno(), 0, access=access)
        dtype = np.dtype(t["dtype"]).newbyteorder("<")
        array = np.frombuffer(self._maps[key], dtype, t["nbytes"] // dtype.itemsize, t["offset"])
        return array.reshape(t["shape"])

    def spec(self, name: str) -> tuple[list[int], str]:
        """A tensor's shape and dtype, read from the index alone."""
        t = self._tensors[name]
        return list(t["shape"]), t["dtype"]

    def read_into(self, targets: Mapping[str, np.ndarray]) -> None:
        """Read each named tensor straight into its array (C-contiguous, of the tensor's size),
        shard by shard in file order: one read of each byte, no copy in between. A shard not
        hashed yet is hashed as it is read, the gaps between its tensors included."""
        import hashlib

        wanted = sorted((self._tensors[n]["shard"], self._tensors[n]["offset"], n)
                        for n in targets)  # fmt: skip
        for shard in sorted({s for s, _, _ in wanted}):
            digest = hashlib.sha256() if shard in self._unchecked else None
            with open(self._path(shard), "rb", buffering=0) as f:
                for _, offset, name in (w for w in wanted if w[0] == shard):
                    if digest is not None and offset > f.tell():
                        digest.update(self._read(f, offset - f.tell()))
                    f.seek(offset)
                    out = memoryview(targets[name].reshape(-1).view(np.uint8))
                    if len(out) != self._tensors[name]["nbytes"]:
                        raise WeightsError(f"{name}: {len(out)} bytes to read into, the shard "
                                           f"holds {self._tensors[name]['nbytes']}")  # fmt: skip
                    if f.readinto(out) != len(out):
                        raise WeightsError(f"weight shard {self._path(shard)} ended early; "
                                           f"{self._fix}")  # fmt: skip
                    self.bytes_read += len(out)
                    if digest is not None:
                        digest.update(out)
                if digest is not None:
                    digest.update(self._read(f, self._shards[shard]["nbytes"] - f.tell()))
                    self._checked(shard, digest.hexdigest())

    def _read(self, f: BinaryIO, n: int) -> bytes:
        data = f.read(n)
        self.bytes_read += len(data)
        return data
