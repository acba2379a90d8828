"""Scenarios: realistic inputs that drive the real runs kernel calls are carved from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tapml.errors import TapmlError

if TYPE_CHECKING:
    from tapml.tokenizer import Tokenizer

DECODE_STEPS = 8  # greedy tokens generated after each prompt


@dataclass(frozen=True)
class Scenario:
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

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "prompt": self.prompt,
                "chat": self.chat, "decode_steps": self.decode_steps}  # fmt: skip


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


def select(names: tuple[str, ...] = (), prompts: tuple[str, ...] = ()) -> list[Scenario]:
    """The named scenarios plus one per user prompt; every built-in one when none is given."""
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise TapmlError(
            f"unknown scenario {unknown[0]!r}; choose one of: {', '.join(SCENARIOS)}"
        )
    chosen = [SCENARIOS[n] for n in names]
    chosen += [Scenario(f"prompt{i + 1}", "a prompt given on the command line", text)
               for i, text in enumerate(prompts)]  # fmt: skip
    return chosen or list(SCENARIOS.values())
