"""A compiled model's directory: what it holds, and where (docs/formats.md, "Compiled artifact").

    DIR/tapml-config.json   what was compiled, with which settings (format versioned)
    DIR/checksums.json      the size and sha256 of every other file but the weight shards
    DIR/plan.json           the execution plan
    DIR/kernels_<target>.*  the plan's kernels for the target
    DIR/weights/            converted weights: .bin shards + index.json
    DIR/tokenizer/          tokenizer.json + tokenizer_config.json (chat template included)

Every module that reads or writes an artifact goes through `Artifact`, so the layout is
spelled here alone.
"""

from __future__ import annotations

import json
import logging
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checksums import check_files, file_sha256, listed_files
from .errors import TapmlError, WeightsError
from .fileio import read_document, write_atomic

if TYPE_CHECKING:
    from .plan import Plan
    from .tokenizer import Tokenizer
    from .weights import WeightShards

log = logging.getLogger("tapml")

CONFIG_FILE = "tapml-config.json"
CONFIG_FORMAT, CONFIG_VERSION = "tapml-artifact", 1
CHECKSUMS_FILE = "checksums.json"
CHECKSUMS_FORMAT, CHECKSUMS_VERSION = "tapml-checksums", 1
PLAN_FILE = "plan.json"
WEIGHTS_DIR = "weights"
TOKENIZER_DIR = "tokenizer"


class Artifact:
    """A compiled model's directory (complete or being written)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @staticmethod
    def is_artifact(path: str | Path) -> bool:
        """Whether `path` is a compiled model's directory (it has a config)."""
        return (Path(path) / CONFIG_FILE).is_file()

    # -- where things are ---------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def checksums_file(self) -> Path:
        return self.path / CHECKSUMS_FILE

    @property
    def plan_file(self) -> Path:
        return self.path / PLAN_FILE

    @property
    def weights_dir(self) -> Path:
        return self.path / WEIGHTS_DIR

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR

    def kernels_file(self, target: str | None = None) -> Path:
        """The kernels file of `target` (default: the target the artifact was compiled for)."""
        from tapml.targets import get_target

        return self.path / get_target(target or self.target).kernels

    def files(self, target: str) -> list[Path]:
        """The files a complete artifact for `target` holds (the weights by their index; an
        ONNX graph's, no tokenizer)."""
        files = [self.config_file, self.plan_file, self.weights_dir / "index.json",
                 self.kernels_file(target)]  # fmt: skip
        return files + [self.tokenizer_dir / "tokenizer.json"] if self.tokenized else files

    @property
    def tokenized(self) -> bool:
        """Whether the model has a tokenizer: all but an imported graph (by its config; an
        unreadable config counts as a tokenized model's, so that the artifact is incomplete)."""
        from tapml.graph import GRAPH_ARCHITECTURE

        try:
            return self.config["model"].get("architecture") != GRAPH_ARCHITECTURE
        except (TapmlError, KeyError, TypeError, AttributeError):
            return True

    def complete(self, target: str) -> bool:
        """Whether every file of an artifact for `target` is there, checksums.json included."""
        return all(path.is_file() for path in [*self.files(target), self.checksums_file])

    # -- checksums ------------------------------------------------------------------------
    def write_checksums(self) -> None:
        """Write checksums.json: the size and sha256 of every file but the weight shards, whose
        sha256s weights/index.json holds (it is listed itself)."""
        shards = {f["path"] for f in self.shard_checksums()}
        files = []
        for path in sorted(p for p in self.path.rglob("*") if p.is_file()):
            name = path.relative_to(self.path).as_posix()
            # .NAME.tmp: what an interrupted atomic write left
            if name not in shards and name != CHECKSUMS_FILE and not path.name.startswith("."):
                files.append({"path": name, "nbytes": path.stat().st_size,
                              "sha256": file_sha256(path)})  # fmt: skip
        document = {"format": CHECKSUMS_FORMAT, "version": CHECKSUMS_VERSION, "files": files}
        write_atomic(self.checksums_file, json.dumps(document, indent=1).encode())

    def checksums(self) -> list[dict[str, Any]]:
        """checksums.json's files: `{"path", "nbytes", "sha256"}` each."""
        remedy = "compile the model again"
        document = read_document(
            self.checksums_file, CHECKSUMS_FORMAT, CHECKSUMS_VERSION, TapmlError, remedy,
            missing=f"{self.path} has no {CHECKSUMS_FILE} (compiled by a tapml older than "
            f"checksums): {remedy}",
        )  # fmt: skip
        return listed_files(document, str(self.checksums_file), TapmlError, remedy)

    def shard_checksums(self) -> list[dict[str, Any]]:
        """The weight shards' `{"path", "nbytes", "sha256"}`, from weights/index.json."""
        from tapml.weights import read_index

        shards = read_index(self.weights_dir)["shards"]
        return [{"path": f"{WEIGHTS_DIR}/{s['file']}", "nbytes": s["nbytes"],
                 "sha256": s["sha256"]} for s in shards]  # fmt: skip

    def changed(self) -> list[str]:
        """Each file that differs from checksums.json, named with how; a file unchanged since
        it was last hashed is not read again. The weight shards are checked as they load
        (`weights`)."""
        return check_files(self.path, self.checksums(), CHECKSUMS_FILE, remembered=True)

    def check(self) -> None:
        """Refuse an artifact whose files differ from checksums.json, naming each: call it
        before loading them (a truncated kernel library crashes the process that loads it)."""
        if not self.checksums_file.is_file():
            # compiled before artifacts had checksums: still runs, its weights still checked
            log.warning("%s has no %s: its kernels, plan and tokenizer go unchecked; "
                        "compile the model again to have them checked", self.path,
                        CHECKSUMS_FILE)  # fmt: skip
            return
        problems = self.changed()
        if problems:
            raise TapmlError(f"{self.path} is damaged ({'; '.join(problems)}): compile the "
                             "model again")  # fmt: skip

    def damaged(self, progress: bool = False) -> list[str]:
        """Every file of the artifact, the weight shards included, that is missing, of another
        size or fails its sha256, each named; every file is read (nothing remembered)."""
        problems = check_files(self.path, self.checksums(), CHECKSUMS_FILE, progress=progress)
        try:
            shards = self.shard_checksums()
        except WeightsError:
            return problems  # weights/index.json is damaged, which the problems above name
        index = f"{WEIGHTS_DIR}/index.json"
        return problems + check_files(self.path, shards, index, progress=progress)

    # -- what it holds --------------------------------------------------------------------
    @cached_property
    def config(self) -> dict[str, Any]:
        """tapml-config.json, checked."""
        return read_document(
            self.config_file, CONFIG_FORMAT, CONFIG_VERSION, TapmlError, "compile the model again",
            missing=f"{self.path} is not a compiled tapml model (no {CONFIG_FILE})",
        )  # fmt: skip

    @property
    def options(self) -> dict[str, Any]:
        return self.config["options"]

    @property
    def target(self) -> str:
        return self.options["target"]

    def plan(self) -> Plan:
        from tapml.plan import Plan

        return Plan.load(self.plan_file)

    def tokenizer(self) -> Tokenizer:
        from tapml.tokenizer import Tokenizer

        return Tokenizer.load(self.tokenizer_dir)

    def weights(self, verify: bool = True) -> WeightShards:
        """Every parameter, by name, read when used; checked against the shards' sha256 when
        `verify` (once per version of each shard file, see `WeightShards`)."""
        from tapml.weights import WeightShards

        return WeightShards(self.weights_dir, verify=verify)


def describe(artifact: str | Path) -> dict[str, Any]:
    """The artifact's tapml-config.json, checked."""
    return Artifact(artifact).config
