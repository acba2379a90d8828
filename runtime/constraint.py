"""What constrains generation to a grammar, as the generation loop sees it.

A constraint masks the logits before sampling (tokens the grammar forbids get -inf), is told
every token that was chosen, and says when the grammar is complete. Backends (llguidance,
xgrammar) live in runtime/grammar.py and implement this protocol.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Constraint(Protocol):
    def mask(self, logits: np.ndarray) -> np.ndarray:
        """The logits with every token the grammar does not allow next set to -inf."""

    def accept(self, token: int) -> None:
        """Advance the grammar by the chosen token (an error if it was not allowed)."""

    def is_complete(self) -> bool:
        """True once the grammar accepts the text so far and allows nothing but its end."""
