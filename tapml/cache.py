"""The compile cache: artifacts keyed by a hash of everything that determines them."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import __version__
from .artifact import Artifact
from .checksums import remembered_sha256
from .compiler import CompileOptions
from .errors import TapmlError

log = logging.getLogger("tapml")


WEIGHTS_STORE = "weights"  # converted weights shared by the artifacts of every target


def cache_root() -> Path:
    """$TAPML_CACHE_DIR, else $XDG_CACHE_HOME/tapml, else ~/.cache/tapml."""
    if os.environ.get("TAPML_CACHE_DIR"):
        return Path(os.environ["TAPML_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tapml"


@functools.cache
def _source_digest() -> str:
    """A hash of tapml's own source: a change in any compiler module invalidates artifacts.
    Taken once per process, so that it describes the code this process runs even if the files
    change meanwhile."""
    import tapml.models
    import tapml.runtime
    import tapml.targets

    digest = hashlib.sha256()
    roots = [Path(m.__file__).parent for m in (__import__("tapml"), tapml.models, tapml.targets)]
    roots.append(Path(tapml.runtime.__file__).parent)
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            digest.update(path.relative_to(root.parent).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(gguf_path: Path, options: CompileOptions) -> str:
    """A hash of the model file, the options that shape its artifact and tapml's code: an
    embedding model asked for with another KV cache dtype finds the same artifact."""
    from .models import model_task

    inputs = {
        "weights": remembered_sha256(gguf_path),
        **_companions(gguf_path),
        "options": options.shaping(model_task(gguf_path)),
        "tapml": __version__,
        "tapml_source": _source_digest(),
        "tvm": _tvm_version(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _tvm_version() -> str:
    """The installed TVM's version, read without importing it (see targets/tvm_runtime)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("apache-tvm")
    except PackageNotFoundError:  # built from source
        import tvm

        return tvm.__version__


def _companions(model_path: Path) -> dict[str, str]:
    """The sha256 of a checkpoint's config.json and tokenizer.json (a GGUF has none: its
    file holds both)."""
    from .safetensors_file import CONFIG_FILE, TOKENIZER_FILE, is_checkpoint

    if not is_checkpoint(model_path):
        return {}
    files = [Path(model_path).parent / name for name in (CONFIG_FILE, TOKENIZER_FILE)]
    return {path.name: remembered_sha256(path) for path in files if path.is_file()}


def shared_weights_dir(model_path: Path, quantization: str, params: list, row_splits: Any
                       ) -> Path:  # fmt: skip
    """Where `model_path`'s weights converted to `quantization` are kept once for every target
    whose plan has these parameters (`[name, shape, dtype]` each) and row splits: artifacts
    take their shards from here by hard link (`share_weights`)."""
    inputs = {
        "weights": remembered_sha256(model_path),
        **_companions(model_path),
        "quantization": quantization,
        "params": params,
        "row_splits": row_splits,
        "tapml_source": _source_digest(),
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / WEIGHTS_STORE / f"{Path(model_path).stem}-{quantization}-{key}"


def share_weights(source: Path, destination: Path) -> bool:
    """Hard-link the weight shards and index of `source` into `destination` (index last, so
    that a destination with an index is complete); False, leaving nothing, where the files
    cannot be linked (another file system) or `source` is damaged."""
    from .weights import INDEX, WeightShards

    try:
        WeightShards(source).check()  # hashes only what was never hashed as it is now
    except TapmlError as e:
        log.warning("the shared weights %s are damaged (%s): converting again", source, e)
        return False
    destination.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in source.glob("params_shard_*.bin")) + [INDEX]
    try:
        for name in names:
            (destination / name).unlink(missing_ok=True)
            os.link(source / name, destination / name)
    except OSError as e:
        log.debug("cannot link %s into %s: %s", source, destination, e)
        for name in names:
            (destination / name).unlink(missing_ok=True)
        return False
    return True


def publish_weights(weights_dir: Path, store: Path) -> None:
    """Make `weights_dir`'s shards the shared copy at `store` (linked into a temporary folder,
    then renamed into place: a store entry is complete or absent)."""
    from .weights import WeightShards

    if store.exists():
        try:
            WeightShards(store).check()
            return
        except TapmlError:  # damaged (a shard written over in place): replace it
            shutil.rmtree(store, ignore_errors=True)
    tmp = store.with_name(f".{store.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if share_weights(weights_dir, tmp):
        try:
            tmp.rename(store)
        except OSError:  # another process published it first
            pass
    shutil.rmtree(tmp, ignore_errors=True)


def entry_dir(name: str, gguf_path: Path, options: CompileOptions) -> Path:
    key = cache_key(gguf_path, options)[:16]
    return cache_root() / f"{name}-{options.quantization}-{options.target}-{key}"


@contextmanager
def entry_lock(entry: Path) -> Iterator[None]:
    """Hold the entry's lock file: one process compiles it while the others wait, so none
    replaces an artifact another is reading. The holder deletes the file when done."""
    import fcntl

    path = entry.with_name(entry.name + ".lock")
    entry.parent.mkdir(parents=True, exist_ok=True)
    while True:
        lock = open(path, "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except BaseException:
            lock.close()
            raise
        if _is_at(lock, path):
            break
        lock.close()  # its holder deleted it while this process waited: lock the one there now
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still locked, so that every waiter sees it deleted
        lock.close()


def _is_at(file, path: Path) -> bool:
    """Whether the open `file` is the one at `path`."""
    try:
        return os.path.samestat(os.fstat(file.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def entries() -> list[tuple[Path, int]]:
    """Complete cache entries with their sizes in bytes."""
    root = cache_root()
    if not root.is_dir():
        return []
    found = []
    for d in sorted(root.iterdir()):
        if Artifact.is_artifact(d):
            found.append((d, sum(f.stat().st_size for f in d.rglob("*") if f.is_file())))
    return found


def clear() -> int:
    """Delete every cache entry (complete or partial) and the weights they share; returns how
    many entries were removed."""
    root = cache_root()
    if not root.is_dir():
        return 0
    removed = 0
    for d in root.iterdir():
        if d.is_dir():
            shutil.rmtree(d)
            removed += d.name != WEIGHTS_STORE
        elif d.suffix == ".lock":
            d.unlink(missing_ok=True)  # its holder may have deleted it meanwhile
    return removed
