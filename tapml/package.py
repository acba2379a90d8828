"""Bundles: a compiled artifact plus what a browser or a phone needs to run it, with checksums.

A bundle IS an artifact directory (tapml-config.json, plan.json, the kernels file, weights/,
tokenizer/), so everything that runs artifacts runs bundles, plus `bundle.json`: a versioned
manifest with the size and sha256 of every file and the record of the device limits and
features the bundle needs. A web bundle also holds the JavaScript runtime (`runtime/`, the
third-party modules it imports under `runtime/vendor/`) and `index.html`, the page of the plan's
task: a chat page for a causal LM, sentence similarity for an embedding model, an image in and
the outputs shown for an ONNX graph.
Layout and fields: docs/formats.md ("Bundle").
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .artifact import Artifact
from .checksums import check_files, listed_files
from .errors import BundleError
from .fileio import read_document, write_atomic

log = logging.getLogger("tapml")

MANIFEST = "bundle.json"
FORMAT, VERSION = "tapml-bundle", 2  # 2: the plan's task replaces max_context and chunk
# what `tapml package --target` offers, and the compile target whose kernels each one ships
PLATFORMS = {"webgpu": "webgpu", "android": "opencl"}
# npm packages the web runtime imports: bundle file name -> (package, file inside it)
VENDOR = {
    "web-tokenizers.js": ("@mlc-ai/web-tokenizers", "lib/index.js"),
    "web-xgrammar.js": ("@mlc-ai/web-xgrammar", "lib/index.js"),
}
# the page a web bundle opens (its index.html) for each task kind, from runtime/web
PAGES = {"causal_lm": "index.html", "embedding": "similarity.html", "graph": "graph.html"}
CHUNK = 1 << 20


def runtime_web_dir() -> Path:
    """runtime/web: the JavaScript runtime's sources, and node_modules/ where npm put its deps."""
    import tapml.runtime

    return Path(tapml.runtime.__file__).resolve().parent / "web"


@dataclass
class Packaged:
    """What `package` wrote: the bundle directory and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(f["nbytes"] for f in self.manifest["files"])


def package(
    model: str,
    platform: str,
    output: Path,
    quantization: str | None = None,
    max_context: int | None = None,
    chunk: int | None = None,
    progress: bool = True,
    buckets: tuple[tuple[int, int], ...] | None = None,
) -> Packaged:
    """Package MODEL (a name, a .gguf, or an artifact compiled for the platform's target) for
    `platform` ("webgpu" or "android") into the directory `output`. `max_context` and `chunk`
    shape a causal LM, `buckets` an embedding model, when MODEL is compiled here.

    The bundle is built in `output.partial` and renamed to `output` when complete; an
    existing `output` is replaced only when it is a bundle itself.
    """
    from tapml.api import artifact_for

    if platform not in PLATFORMS:
        raise BundleError(f"unknown platform {platform!r}; choose one of: {', '.join(PLATFORMS)}")
    target = PLATFORMS[platform]
    output = Path(output)
    if output.exists() and not (output / MANIFEST).is_file() and any(output.iterdir()):
        raise BundleError(f"{output} exists and is not a bundle; choose another -o directory")
    vendor = _vendor_files() if platform == "webgpu" else {}  # fail before compiling
    artifact = Artifact(artifact_for(model, target, quantization, max_context, chunk,
                                     progress=progress, buckets=buckets))  # fmt: skip
    artifact.check()  # a bundle's manifest must not vouch for damaged files
    config, options, plan = artifact.config, artifact.options, artifact.plan()
    if options["target"] != target:
        raise BundleError(
            f"{artifact.path} was compiled for {options['target']}; a {platform} bundle needs "
            f"{target} kernels: pass the model's name or compile it with --target {target}"
        )
    if quantization and options["quantization"] != quantization:
        raise BundleError(
            f"{artifact.path} holds {options['quantization']} weights, not {quantization}: pass "
            "the model's name to compile it anew"
        )
    page = _page(plan.task["kind"]) if platform == "webgpu" else None

    work = output.with_name(output.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    sources = _artifact_files(artifact, target)
    if platform == "webgpu":
        sources += [(f"runtime/{p.name}", p) for p in _runtime_sources()]
        sources += [(f"runtime/vendor/{name}", path) for name, (path, _) in vendor.items()]
        sources.append(("index.html", page))
    files = _copy_all(sources, work, progress)
    name = config["model"].get("source", "")
    if artifact.path != Path(model):  # a model name or a GGUF, not an artifact directory
        from tapml.models import resolve_gguf

        name = resolve_gguf(model)[0]
    manifest = _manifest(config, platform, name, artifact, plan, files, vendor)
    write_atomic(work / MANIFEST, json.dumps(manifest, indent=1).encode())
    if output.exists():
        shutil.rmtree(output)
    work.rename(output)
    if platform == "android" and manifest["quantization"] in ("q4f16_1", "q0f16"):
        log.warning(
            "%s is packaged, but its float16 kernels cannot execute on PoCL (no cl_khr_fp16); "
            "a phone GPU with fp16 runs it", output
        )  # fmt: skip
    return Packaged(output, manifest)


def _artifact_files(artifact: Artifact, target: str) -> list[tuple[str, Path]]:
    """(path in the bundle, file) of everything a compiled artifact for `target` holds."""
    paths = [artifact.config_file, artifact.checksums_file, artifact.plan_file,
             artifact.kernels_file(target)]  # fmt: skip
    for path in [*artifact.files(target), artifact.checksums_file]:
        if not path.is_file():
            raise BundleError(f"{artifact.path} has no {path.name}: compile the model again")
    for directory in (artifact.weights_dir, artifact.tokenizer_dir):
        paths += sorted(p for p in directory.rglob("*") if p.is_file())
    return [(p.relative_to(artifact.path).as_posix(), p) for p in paths]


def _runtime_sources() -> list[Path]:
    sources = sorted(runtime_web_dir().glob("*.js"))
    if not sources:
        raise BundleError(f"{runtime_web_dir()} holds no JavaScript runtime; reinstall tapml")
    return sources


def _page(kind: str) -> Path:
    """The web page of a plan's task kind."""
    if kind not in PAGES:
        raise BundleError(f"web bundles have no page for a {kind} model; they have pages for: "
                          f"{', '.join(PAGES)}")  # fmt: skip
    return runtime_web_dir() / PAGES[kind]


def _vendor_files() -> dict[str, tuple[Path, dict[str, str]]]:
    """The npm modules the web runtime imports: name -> (file, its package's name/version)."""
    modules = runtime_web_dir() / "node_modules"
    found = {}
    for name, (package_name, inner) in VENDOR.items():
        path = modules / package_name / inner
        if not path.is_file():
            raise BundleError(
                f"{path} is missing: web bundles need the npm package {package_name}; install "
                "it with `bash scripts/setup.sh` (npm ci --prefix runtime/web)"
            )
        meta = json.loads((modules / package_name / "package.json").read_text())
        found[name] = (path, {k: meta.get(k, "") for k in ("name", "version", "license")})
    return found


def _copy_all(sources: list[tuple[str, Path]], work: Path, progress: bool) -> list[dict]:
    from tqdm import tqdm

    total = sum(path.stat().st_size for _, path in sources)
    files = []
    with tqdm(total=total, desc="Packaging", unit="B", unit_scale=True, file=sys.stderr,
              disable=not progress) as bar:  # fmt: skip
        for name, path in sources:
            files.append(_copy_hashed(path, work / name, name, bar.update))
    return files


def _copy_hashed(source: Path, destination: Path, name: str, advance) -> dict[str, Any]:
    """Copy `source` and hash the bytes as they are written (a cache file is never linked:
    a bundle edited in place must not corrupt the cache)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    sha, nbytes = hashlib.sha256(), 0
    with open(source, "rb") as src, open(destination, "wb") as dst:
        while block := src.read(CHUNK):
            dst.write(block)
            sha.update(block)
            nbytes += len(block)
            advance(len(block))
    return {"path": name, "nbytes": nbytes, "sha256": sha.hexdigest()}


def _manifest(config: dict, platform: str, name: str, artifact: Artifact, plan, files: list[dict],
              vendor: dict) -> dict[str, Any]:  # fmt: skip
    from tapml.targets import get_target

    options = config["options"]
    spec = get_target(options["target"])
    if platform == "webgpu":
        from tapml.targets.records import load_records

        requirements = webgpu_requirements(plan, load_records(artifact.kernels_file()), spec)
    else:
        requirements = opencl_requirements(plan, artifact.kernels_file())
    return {
        "format": FORMAT,
        "version": VERSION,
        "tapml_version": __version__,
        "platform": platform,
        "target": options["target"],
        "model": name,
        "source": config["model"].get("source", ""),
        "quantization": options["quantization"],
        "weights": config["weights"],  # each matrix's format, and totals per format
        # the task's kind and sizes, without its entry points (those are in plan.json)
        "task": {k: v for k, v in plan.task.items() if not isinstance(v, dict)},
        "requirements": requirements,
        "chat": chat_format(artifact.tokenizer()) if artifact.tokenized else None,
        "third_party": [meta for _, meta in vendor.values()],
        "files": files,
    }


def _camel(name: str) -> str:
    """wgpu's limit names (max-buffer-size) as the WebGPU JavaScript API spells them."""
    head, *rest = name.split("-")
    return head + "".join(word.capitalize() for word in rest)


def _memory(plan) -> int:
    """Bytes of device memory the plan allocates: params, state, io and the shared storages."""
    roots = [n for n, b in plan.buffers.items() if b["kind"] not in ("temp", "view")]
    return sum(map(plan.nbytes, roots)) + sum(plan.storages.values())


def webgpu_requirements(plan, records: dict, spec) -> dict[str, Any]:
    """The WebGPU limits (JavaScript names) and features a device needs to run the plan: the
    same the wgpu executor requests (targets/webgpu.py `required_limits`)."""
    from tapml.targets.webgpu import required_limits

    limits = {_camel(k): v for k, v in required_limits(plan, records, spec).items()}
    features = ["shader-f16"] if plan.uses_float16 else []
    return {"api": "webgpu", "limits": limits, "features": features,
            "memory_bytes": _memory(plan)}  # fmt: skip


def opencl_requirements(plan, kernels_path: Path) -> dict[str, Any]:
    """The OpenCL device properties (clGetDeviceInfo names) a device needs to run the plan."""
    from tapml.targets.records import load_records

    dispatches = [d for r in load_records(kernels_path).values() for d in r["dispatches"]]
    threads = [d["workgroup"][0] * d["workgroup"][1] * d["workgroup"][2] for d in dispatches]
    roots = [n for n, b in plan.buffers.items() if b["kind"] not in ("temp", "view")]
    largest = max([*map(plan.nbytes, roots), *plan.storages.values()])
    return {
        "api": "opencl",
        "version": "OpenCL 1.2",
        "extensions": ["cl_khr_fp16"] if plan.uses_float16 else [],
        "CL_DEVICE_MAX_WORK_GROUP_SIZE": max(threads, default=1),
        "CL_DEVICE_LOCAL_MEM_SIZE": max((d["shared_bytes"] for d in dispatches), default=0),
        "CL_DEVICE_MAX_MEM_ALLOC_SIZE": largest,
        "CL_DEVICE_GLOBAL_MEM_SIZE": _memory(plan),
    }


# -- chat template as plain strings -----------------------------------------------------------
_MARK = "\x00{}\x00"


def chat_format(tokenizer) -> dict[str, Any] | None:
    """The model's chat template reduced to strings a runtime without Jinja concatenates.

    {"turns": {role: [before, after]}, "first_without_system": str, "generation": str}: a
    conversation is `first_without_system` (when it opens with no system message) then each
    message as before + content + after, then `generation`. None (with a warning) for a
    template that is not this shape; `render_chat` checks the reduction on sample talks.
    """
    if not tokenizer.chat_template:
        return None

    def render(messages: list[tuple[str, str]], generation: bool = False) -> str:
        roles = [{"role": r, "content": c} for r, c in messages]
        return tokenizer.apply_chat_template(roles, add_generation_prompt=generation)

    s, u, a = (("system", _MARK.format("s")), ("user", _MARK.format("u")),
               ("assistant", _MARK.format("a")))  # fmt: skip
    try:
        system = render([s])
        user = _after(render([s, u]), system)
        assistant = _after(render([s, u, a]), system + user)
        generation = _after(render([s, u], True), system + user)
        first = render([u])
        first_without_system = first[: len(first) - len(user)] if first.endswith(user) else None
        turns = {role: _split(text, mark)
                 for role, text, (_, mark) in [("system", system, s), ("user", user, u),
                                               ("assistant", assistant, a)]}  # fmt: skip
        if first_without_system is None or None in turns.values():
            raise ValueError("turns are not independent of each other")
        chat = {"turns": turns, "first_without_system": first_without_system,
                "generation": generation}  # fmt: skip
        samples = [
            [("user", "Hi")],
            [("system", "Be brief."), ("user", "Hi")],
            [("user", "Hi"), ("assistant", "Hello!"), ("user", "Name a river.")],
        ]
        for talk in samples:
            messages = [{"role": r, "content": c} for r, c in talk]
            if render_chat(chat, messages) != render(talk, True):
                raise ValueError(f"{talk} renders differently")
    except Exception as e:  # noqa: BLE001 - any template the reduction cannot express
        log.warning("the chat template is not kept in the bundle (%s): the chat page will "
                    "complete plain text", e)  # fmt: skip
        return None
    return chat


def _after(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise ValueError("a turn changes the text before it")
    return text[len(prefix) :]


def _split(text: str, mark: str) -> list[str] | None:
    parts = text.split(mark)
    return parts if len(parts) == 2 else None


def render_chat(chat: dict[str, Any], messages: list[dict[str, str]]) -> str:
    """A prompt from `chat_format`'s record, as the JavaScript runtime builds it."""
    text = "" if messages and messages[0]["role"] == "system" else chat["first_without_system"]
    for m in messages:
        before, after = chat["turns"][m["role"]]
        text += before + m["content"] + after
    return text + chat["generation"]


# -- verification -----------------------------------------------------------------------------
def read_manifest(directory: Path) -> dict[str, Any]:
    """The bundle's manifest, checked for its format and version."""
    path = Path(directory) / MANIFEST
    remedy = "package the model again"
    manifest = read_document(path, FORMAT, VERSION, BundleError, remedy,
                             missing=f"{directory} is not a tapml bundle: it has no {MANIFEST}")
    listed_files(manifest, str(path), BundleError, remedy)
    return manifest


def verify(directory: Path, progress: bool = False) -> list[str]:
    """Every problem with the bundle's files: missing, truncated or failing its sha256, each
    named by its path. Empty when the bundle is intact. A bad manifest raises BundleError."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = check_files(directory, manifest["files"], MANIFEST, progress=progress)
    required = [p.relative_to(directory).as_posix()
                for p in Artifact(directory).files(manifest["target"])]  # fmt: skip
    listed = {f["path"] for f in manifest["files"]}
    problems += [f"{name}: not in {MANIFEST}" for name in required if name not in listed]
    return problems
