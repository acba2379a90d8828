"""A compiled sentence encoder ready to embed texts: the plan's buckets on an executor."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tapml.plan import SentenceEmbedding

from .engine import open_artifact

log = logging.getLogger("tapml")


class Embedder:
    """Embeds texts with a compiled encoder: each text's tokens go to the shortest bucket that
    holds them, in batches as large as that length's buckets allow (a short batch padded
    with empty rows); a text longer than the longest bucket is cut to it, with a warning."""

    def __init__(self, artifact: Path, verify_weights: bool = True, executor: Any = None):
        """`executor`: one that already holds this artifact's kernels and weights."""
        opened = open_artifact(artifact, SentenceEmbedding, verify_weights, executor)
        self.artifact, self.config, self.target = opened.path, opened.config, opened.target
        self.plan, self.tokenizer, self.executor = opened.plan, opened.tokenizer, opened.executor
        self.task = opened.task
        self.dim = self.task.dim

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids ([CLS] ... [SEP] for BERT), cut to the longest bucket."""
        limit, rows = self.task.max_length, []
        for i, text in enumerate(texts):
            ids = self.tokenizer.encode(text)
            if len(ids) > limit:
                log.warning("text %d has %d tokens; only its first %d are embedded (the longest "
                            "compiled bucket)", i + 1, len(ids), limit)  # fmt: skip
                ids = ids[: limit - 1] + ids[-1:]  # keep the closing [SEP]
            rows.append(ids)
        return rows

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """The unit-length embedding of each text, [len(texts), dim] float32."""
        if isinstance(texts, str):
            texts = [texts]
        return self.embed_ids(self.tokenize(texts))

    def embed_ids(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """The embedding of each row of token ids (each at most the longest bucket)."""
        out = np.zeros((len(rows), self.dim), np.float32)
        for bucket, members in self.batches([len(r) for r in rows]):
            call = self.task.call(bucket, [rows[i] for i in members])
            out[members] = self.executor.run(*call)[: len(members)]
        return out

    def batches(self, lengths: Sequence[int]) -> list[tuple[dict[str, Any], list[int]]]:
        """(bucket, row indices) runs covering rows of these lengths: rows grouped by the
        shortest bucket length that holds them, then cut into that length's largest batches;
        a last single row takes a batch-1 bucket where there is one."""
        by_length: dict[int, list[int]] = {}
        fits = self.task.lengths()
        for i, n in enumerate(lengths):
            if not 0 < n <= fits[-1]:
                raise ValueError(f"row {i} has {n} tokens; the buckets hold 1 to {fits[-1]}")
            by_length.setdefault(next(s for s in fits if s >= n), []).append(i)
        runs = []
        for length, members in sorted(by_length.items()):
            buckets = [b for b in self.task.buckets if b["length"] == length]
            largest = max(buckets, key=lambda b: b["batch"])
            while members:
                bucket = buckets[0] if len(members) == 1 else largest
                runs.append((bucket, members[: bucket["batch"]]))
                members = members[bucket["batch"] :]
        return runs
