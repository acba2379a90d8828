"""Scenarios: realistic inputs that drive the real runs kernel calls are carved from.

Which scenarios apply is the plan's task kind: a causal LM's are prompts (prefill and greedy
decode steps), an embedding model's are requests of texts, an image graph's are pages of text
rendered when the scenario runs. Each scenario makes its runs through the runtime of its kind
(`Engine`, `Embedder`, `GraphRunner`), as that runtime would run them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from tapml.errors import SuiteError, TapmlError

from .runs import Run, batches, schedule

if TYPE_CHECKING:
    from tapml.runtime.embedder import Embedder
    from tapml.runtime.engine import Engine
    from tapml.runtime.graph import GraphRunner
    from tapml.tokenizer import Tokenizer

log = logging.getLogger("tapml")
DECODE_STEPS = 8  # greedy tokens generated after each prompt
COMPLETION_TOKENS = 24  # tokens a migrated model generates on the target alone
TASKS = {"causal_lm": "a causal LM", "embedding": "an embedding model",
         "graph": "an image graph"}  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    """A causal LM's scenario: a prompt's prefill, chunk by chunk, and greedy decode steps."""

    kind: ClassVar[str] = "causal_lm"
    name: str
    description: str
    prompt: str
    chat: bool = True  # wrap the prompt in the model's chat template, if it has one
    decode_steps: int = DECODE_STEPS

    def chats(self, tokenizer: Tokenizer) -> bool:
        """Whether the prompt goes through the chat template: asked for, and the model has one
        (a base model such as Gemma-3-270M has none: its prompt is plain text)."""
        return self.chat and bool(tokenizer.chat_template)

    def prompt_ids(self, tokenizer: Tokenizer) -> list[int]:
        text = self.prompt
        if self.chats(tokenizer):
            text = tokenizer.apply_chat_template([{"role": "user", "content": self.prompt}])
        return tokenizer.encode(text)

    def ids(self, engine: Engine) -> list[int]:
        return self.prompt_ids(engine.tokenizer)

    def runs(self, engine: Engine, ids: list[int] | None = None) -> list[Run]:
        """The runs of the prompt's `ids` (default: `self.ids(engine)`)."""
        ids = self.ids(engine) if ids is None else ids
        if len(ids) + self.decode_steps > engine.max_context:
            raise SuiteError(
                f"scenario {self.name}: {len(ids)} prompt tokens and {self.decode_steps} decode "
                f"steps do not fit the compiled context of {engine.max_context}"
            )
        return schedule(ids, self, engine.task)

    def record(self, ids: list[int], fed: list[int]) -> dict[str, Any]:
        """The ids its runs were given: the prompt's, and the greedy tokens decoding was fed."""
        return {"prompt_ids": ids, "generated_ids": fed}

    def alone(self, engine: Engine, source: Engine) -> dict[str, Any]:
        """What the target makes of the scenario on its own: the prompt's greedy completion."""
        log.info("generating on %s alone", engine.target)
        text = "".join(engine.generate(self.prompt, chat=self.chats(engine.tokenizer),
                                       max_tokens=COMPLETION_TOKENS))  # fmt: skip
        return {"completion": text}

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "prompt": self.prompt,
                "chat": self.chat, "decode_steps": self.decode_steps}  # fmt: skip


@dataclass(frozen=True)
class EmbeddingScenario:
    """An embedding model's scenario: requests of texts, each embedded as one `embed` call
    (its texts padded into the compiled buckets and batched as the runtime does)."""

    kind: ClassVar[str] = "embedding"
    name: str
    description: str
    requests: tuple[tuple[str, ...], ...]

    def ids(self, embedder: Embedder) -> list[list[list[int]]]:
        """Each request's texts' token ids (cut to the longest bucket)."""
        return [embedder.tokenize(texts) for texts in self.requests]

    def embed(self, embedder: Embedder) -> np.ndarray:
        """Every text's embedding, request by request, [texts, dim]."""
        return np.concatenate([embedder.embed(list(texts)) for texts in self.requests])

    def runs(self, embedder: Embedder, ids: list[list[list[int]]] | None = None) -> list[Run]:
        """The runs of the requests' `ids` (default: `self.ids(embedder)`)."""
        return batches(self.ids(embedder) if ids is None else ids, embedder)

    def record(self, ids: list[list[list[int]]], fed: list[int]) -> dict[str, Any]:
        """The ids its runs were given: each request's texts' token ids."""
        return {"token_ids": ids}

    def alone(self, embedder: Embedder, source: Embedder) -> dict[str, Any]:
        """What the target makes of the scenario on its own: every text's embedding, compared
        with the source's (unit vectors: their dot product is the cosine similarity)."""
        log.info("embedding on %s alone", embedder.target)
        got, want = self.embed(embedder), self.embed(source)
        return {"embeddings": {"texts": len(got), "source": source.target,
                               "min_cosine": float((got * want).sum(axis=1).min()),
                               "max_abs": float(np.abs(got - want).max())}}  # fmt: skip

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "requests": [list(texts) for texts in self.requests]}  # fmt: skip


@dataclass(frozen=True)
class ImageScenario:
    """An image graph's scenario: pages of text lines, rendered (black on white, Pillow's
    fonts) and fitted to each entry point's input shape as PP-OCR's runtime fits images:
    scaled keeping the aspect, normalized, zero-padded. Graphs of NCHW RGB inputs only."""

    kind: ClassVar[str] = "graph"
    name: str
    description: str
    pages: tuple[tuple[str, ...], ...]
    size: int = 32  # the text's pixel size

    def ids(self, runner: GraphRunner) -> list[dict[str, np.ndarray]]:
        """Each run's inputs: every page at every entry point's shapes."""
        from tapml.runtime.text_image import render_text

        images = [render_text(list(lines), size=self.size) for lines in self.pages]
        return [{name: _fitted(image, shape, name) for name, shape in shapes.items()}
                for image in images for shapes in runner.task.shapes]  # fmt: skip

    def runs(self, runner: GraphRunner, inputs: list[dict[str, np.ndarray]] | None = None
             ) -> list[Run]:  # fmt: skip
        inputs = self.ids(runner) if inputs is None else inputs
        return [Run(i, *runner.task.call(x)) for i, x in enumerate(inputs)]

    def record(self, inputs: list[dict[str, np.ndarray]], fed: list[int]) -> dict[str, Any]:
        """The runs' input shapes (the pages' texts are in the scenario)."""
        return {"input_shapes": [{n: list(a.shape) for n, a in x.items()} for x in inputs]}

    def alone(self, runner: GraphRunner, source: GraphRunner) -> dict[str, Any]:
        """What the target makes of the scenario on its own: every run's first output,
        compared with the source's."""
        log.info("running the graph on %s alone", runner.target)
        worst = 0.0
        for x in self.ids(runner):
            got, want = runner(x[runner.inputs[0]]), source(x[source.inputs[0]])
            scale = max(float(np.abs(want).max()), 1e-30)
            worst = max(worst, float(np.abs(got - want).max()) / scale)
        return {"outputs": {"runs": len(self.ids(runner)), "source": source.target,
                            "max_rel": worst}}  # fmt: skip

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "pages": [list(lines) for lines in self.pages], "size": self.size}  # fmt: skip


def _fitted(image: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    """The rendered page as an input of `shape` (1, 3, H, W)."""
    from PIL import Image

    from tapml.runtime.ocr import normalize

    if len(shape) != 4 or shape[:2] != (1, 3):
        raise SuiteError(f"input {name!r} has shape {shape}: image scenarios make NCHW RGB "
                         "images (1, 3, H, W)")  # fmt: skip
    height, width = shape[2:]
    scale = min(height / image.height, width / image.width)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    pixels = normalize(image.resize(size, Image.Resampling.BILINEAR))
    out = np.zeros(shape, np.float32)
    out[0, :, : size[1], : size[0]] = pixels
    return out


AnyScenario = Scenario | EmbeddingScenario | ImageScenario

_LONG = (
    "Summarize the following notes in two sentences.\n"
    "The river rises in the northern hills, where snowmelt feeds a chain of small lakes. "
    "It flows south through farmland for two hundred kilometres, passing three market towns "
    "whose mills once ground the region's wheat. Below the last town it widens into an "
    "estuary of salt marshes that shelter wading birds in winter. Engineers straightened its "
    "lower course a century ago to stop the spring floods, but the floods moved downstream "
    "instead, and the marshes shrank by a third. A restoration plan now lets the river "
    "spread across its old meanders again; the first results show fewer floods in the towns "
    "and more birds on the estuary each year."
)

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario("chat", "a short chat question", "What is the capital of France?"),
        Scenario("long", "a prompt spanning several prefill chunks (the last one padded)", _LONG),
        Scenario(
            "json", "a question whose answer is a JSON object",
            'Answer only with JSON like {"name": ..., "year": ...}: who first walked on the '
            "Moon, and when?",
        ),
        Scenario(
            "multilingual", "French, German, Japanese and Russian text: multi-byte tokens",
            "Traduis en anglais : « Le chat dort sur le canapé. » Und auf Deutsch: Die Katze "
            "schläft. 日本語では「猫が寝ている」。 По-русски: кошка спит.",
        ),
    ]
}  # fmt: skip


_PASSAGES = (
    "The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
    "Mount Everest is the highest mountain above sea level.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "The Great Barrier Reef lies off the coast of Queensland, Australia.",
    "Penicillin was discovered by Alexander Fleming in 1928.",
)
_DOCUMENT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. It is "
    "named after the engineer Gustave Eiffel, whose company designed and built it between "
    "1887 and 1889 as the entrance arch of the 1889 World's Fair, held for the centennial of "
    "the French Revolution. Many of France's leading artists and intellectuals criticised its "
    "design at first, but it became a global cultural icon of France and one of the most "
    "recognisable structures in the world. The tower is 330 metres tall, about the height of "
    "an 81-storey building, and was the tallest man-made structure in the world until the "
    "Chrysler Building in New York City was finished in 1930. It has three levels for "
    "visitors, with restaurants on the first and second; the top level's upper platform is "
    "276 metres above the ground, and tickets can be bought to ascend by stairs or lift."
)

EMBEDDING_SCENARIOS: dict[str, EmbeddingScenario] = {
    s.name: s
    for s in [
        EmbeddingScenario(
            "search", "a query, a batch of passages and a long document, as a search index "
            "embeds them (with the default buckets: 1x128, 8x128 and 1x256)",
            (("When was the Eiffel Tower built?",), _PASSAGES, (_DOCUMENT,)),
        ),
        EmbeddingScenario(
            "multilingual", "French, Spanish, German, Japanese and Russian sentences in one "
            "batch: accents, CJK and Cyrillic through the tokenizer",
            (("Le chat dort sur le canapé.", "El gato duerme en el sofá.",
              "Die Katze schläft auf dem Sofa.", "猫がソファで寝ている。",
              "Кошка спит на диване."),),
        ),
    ]
}  # fmt: skip

IMAGE_SCENARIOS: dict[str, ImageScenario] = {
    s.name: s
    for s in [
        ImageScenario("document", "two lines of printed text on a page, as OCR reads them",
                      (("Invoice 2026-12-05", "Total: 42.50 EUR"),)),
        ImageScenario("label", "one short line, large", (("tapml",),), size=48),
    ]
}  # fmt: skip

BY_TASK: dict[str, dict[str, Any]] = {"causal_lm": SCENARIOS, "embedding": EMBEDDING_SCENARIOS,
                                      "graph": IMAGE_SCENARIOS}  # fmt: skip
NAMES = list(dict.fromkeys(name for scenarios in BY_TASK.values() for name in scenarios))


def builtin(kind: str) -> dict[str, AnyScenario]:
    """The built-in scenarios of a task kind, the first one the default."""
    if kind not in BY_TASK:
        raise TapmlError(f"carving has no scenarios for a {kind!r} task; it carves "
                         f"{' and '.join(TASKS.values())}s")  # fmt: skip
    return BY_TASK[kind]


def default(kind: str) -> AnyScenario:
    """The scenario a task kind's runs are evaluated on unless told (offload, the matrix)."""
    return next(iter(builtin(kind).values()))


def select(names: Sequence[str] = (), prompts: Sequence[str] = (), kind: str = "causal_lm"
           ) -> list[AnyScenario]:  # fmt: skip
    """The named scenarios of a task kind plus one per user prompt (a text to embed, for an
    embedding model); every built-in one of the kind when none is given."""
    scenarios = builtin(kind)
    unknown = [n for n in names if n not in scenarios]
    if unknown:
        raise TapmlError(f"unknown scenario {unknown[0]!r} for {TASKS[kind]}; choose one of: "
                         f"{', '.join(scenarios)}")  # fmt: skip
    chosen = [scenarios[n] for n in names]
    for i, text in enumerate(prompts):
        name, description = f"prompt{i + 1}", "a prompt given on the command line"
        if kind == "causal_lm":
            chosen.append(Scenario(name, description, text))
        else:  # a text to embed, or to render as a page of one line
            made = EmbeddingScenario if kind == "embedding" else ImageScenario
            chosen.append(made(name, description, ((text,),)))
    return chosen or list(scenarios.values())


def check(scenarios: Sequence[AnyScenario], kind: str) -> None:
    """Refuse scenarios of another task kind than the model's."""
    for s in scenarios:
        if s.kind != kind:
            raise TapmlError(f"scenario {s.name!r} is for {TASKS[s.kind]}, and the model is "
                             f"{TASKS.get(kind, repr(kind))}")  # fmt: skip
