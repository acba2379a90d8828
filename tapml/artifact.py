"""A compiled model's directory: what it holds, and where (docs/formats.md, "Compiled artifact").

    DIR/tapml-config.json   what was compiled, with which settings (format versioned)
    DIR/plan.json           the execution plan
    DIR/kernels_<target>.*  the plan's kernels for the target
    DIR/weights/            converted weights: .bin shards + index.json
    DIR/tokenizer/          tokenizer.json + tokenizer_config.json (chat template included)

Every module that reads or writes an artifact goes through `Artifact`, so the layout is
spelled here alone.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import TapmlError
from .fileio import read_document

if TYPE_CHECKING:
    from .plan import Plan
    from .tokenizer import Tokenizer

CONFIG_FILE = "tapml-config.json"
CONFIG_FORMAT, CONFIG_VERSION = "tapml-artifact", 1
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
        """The files a complete artifact for `target` holds (the weights by their index)."""
        return [self.config_file, self.plan_file, self.weights_dir / "index.json",
                self.tokenizer_dir / "tokenizer.json", self.kernels_file(target)]  # fmt: skip

    def complete(self, target: str) -> bool:
        return all(path.is_file() for path in self.files(target))

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

    def weights(self, verify: bool = True) -> dict[str, Any]:
        """Every parameter, by name, checked against the shards' sha256 when `verify`."""
        from tapml.weights import load_shards

        return load_shards(self.weights_dir, verify=verify)


def describe(artifact: str | Path) -> dict[str, Any]:
    """The artifact's tapml-config.json, checked."""
    return Artifact(artifact).config
