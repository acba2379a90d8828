"""SentencePiece BPE (GGUF tokenizer model "llama": Gemma) encoded as llama.cpp encodes it.

Text runs with spaces shown as U+2581 start as single characters; the adjacent pair whose
joined text is the highest-scoring piece of the vocabulary merges first (the leftmost among
equals), again and again; a character that is no piece becomes its UTF-8 bytes' <0xNN>
pieces. Control pieces ("<end_of_turn>") are never made of text: the caller splits off the
special tokens a text spells. Loading this takes the pieces and their scores alone: an HF
`tokenizers` BPE of the same vocabulary needs every split of every piece as a ranked merge
(513,000 for Gemma-3: a second and 290 MB to load). The HF form is still written for web
bundles.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Sequence
from pathlib import Path

from .errors import TapmlError
from .fileio import write_atomic

# GGUF tokenizer.ggml.token_type values (of every GGUF vocabulary, SentencePiece or not)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4

SPACE = "\u2581"  # SentencePiece's visible space
FILE = "sentencepiece.json"


class SentencePiece:
    """A SentencePiece BPE vocabulary: `encode(text)` gives llama.cpp's ids for text without
    special tokens (Tokenizer.encode splits those off first)."""

    def __init__(self, pieces: Sequence[str], scores: Sequence[float], types: Sequence[int],
                 space_prefix: bool):  # fmt: skip
        self.pieces, self.scores, self.types = list(pieces), list(scores), list(types)
        self.space_prefix = space_prefix
        self.ids = {piece: i for i, piece in enumerate(self.pieces)}  # the last of duplicates
        self._text_ids = {piece: i for piece, i in self.ids.items() if self.types[i] != CONTROL}
        self._bytes = [self.ids.get(f"<0x{b:02X}>") for b in range(256)]

    @classmethod
    def load(cls, path: Path) -> SentencePiece:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(data["pieces"], data["scores"], data["types"], data["space_prefix"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TapmlError(f"{path} is not a valid SentencePiece vocabulary: {e}") from e

    def save(self, path: Path) -> None:
        data = {"pieces": self.pieces, "scores": self.scores, "types": self.types,
                "space_prefix": self.space_prefix}  # fmt: skip
        write_atomic(path, json.dumps(data, ensure_ascii=False).encode())

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        text = text.replace(" ", SPACE)
        if self.space_prefix:
            text = SPACE + text
        ids, scores = self._text_ids, self.scores
        symbols: list[str | None] = list(text)  # None once merged into its left neighbour
        after = list(range(1, len(symbols))) + [-1]
        before = list(range(-1, len(symbols) - 1))
        heap: list[tuple[float, int, int, str]] = []

        def consider(left: int, right: int) -> None:
            joined = symbols[left] + symbols[right]
            piece = ids.get(joined)
            if piece is not None:
                heapq.heappush(heap, (-scores[piece], left, right, joined))

        for i in range(len(symbols) - 1):
            consider(i, i + 1)
        while heap:
            _, left, right, joined = heapq.heappop(heap)
            if symbols[left] is None or symbols[right] is None \
                    or symbols[left] + symbols[right] != joined:  # fmt: skip
                continue  # stale: one side has merged since
            symbols[left], symbols[right] = joined, None
            after[left] = after[right]
            if after[left] >= 0:
                before[after[left]] = left
                consider(left, after[left])
            if before[left] >= 0:
                consider(before[left], left)
        out = []
        for symbol in symbols:
            if symbol is None:
                continue
            piece = ids.get(symbol)
            if piece is not None:
                out.append(piece)
            else:  # a character outside the vocabulary: its bytes
                out += [self._byte(b) for b in symbol.encode()]
        return out

    def _byte(self, b: int) -> int:
        piece = self._bytes[b]
        if piece is None:
            raise TapmlError(f"the vocabulary has no byte piece <0x{b:02X}> for a character "
                             "outside it")  # fmt: skip
        return piece
