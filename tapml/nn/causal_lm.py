"""The entry points of a causal language model over explicit KV caches, and how a runtime
drives them (the plan's `task`, docs/formats.md).

    decode(token[1], pos, caches...)            -> logits [1, vocab], caches
    prefill(tokens[C], pos, n_valid, caches...) -> logits [1, vocab] of row n_valid-1, caches

Shapes are fixed at compile time; only `pos` (where the tokens go) and `n_valid` (how many of
a prefill chunk's tokens are real, the rest padding) vary at run time. An architecture
subclasses `CausalLM`, builds its layers and implements `forward_tokens`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tvm import tirx
from tvm.relax.frontend import nn

from tapml.plan import op, var

from .attention import key_cache_shape

MODE = {"param_mode": "plain", "effect_mode": "none"}
TOKENS = {"decode": "decode.token", "prefill": "prefill.tokens"}


class CausalLM(nn.Module):
    """A causal LM's entry points. Subclasses set their layers, then call `_entry_points`,
    and implement `forward_tokens(ids, pos, n_valid, caches)` -> (logits, *caches) and,
    for parameters computed at compile time, `tables()`."""

    def _entry_points(self, layers: int, kv_heads: int, head_dim: int, max_context: int,
                      chunk: int, kv_cache: str, vocab_size: int) -> None:  # fmt: skip
        self.max_context, self.chunk, self.kv_cache = max_context, chunk, kv_cache
        self.vocab_size = vocab_size
        self._cache_shapes = {"k": key_cache_shape(kv_heads, max_context, head_dim),
                              "v": [kv_heads, max_context, head_dim]}  # fmt: skip
        self._layers = layers
        # The exporter names each function argument after the method's parameters, and
        # the number of caches depends on the config: give the entry points real names.
        caches = self.state_names()
        self.decode = named_args(self._decode, ["token", "pos", *caches])
        self.prefill = named_args(self._prefill, ["tokens", "pos", "n_valid", *caches])

    def forward_tokens(self, ids: nn.Tensor, pos: Any, n_valid: Any, caches: Sequence[Any]):
        raise NotImplementedError(f"{type(self).__name__} must implement forward_tokens")

    def tables(self) -> dict[str, np.ndarray]:
        """Parameters computed rather than read from the model file, by name."""
        return {}

    def _decode(self, token, pos, *caches):
        return self.forward_tokens(token, pos, tirx.IntImm("int64", 1), caches)

    def _prefill(self, tokens, pos, n_valid, *caches):
        return self.forward_tokens(tokens, pos, n_valid, caches)

    def state_names(self) -> list[str]:
        """The KV caches, kept between calls: a key and a value cache per layer."""
        return [f"{kv}_cache_{i}" for i in range(self._layers) for kv in "kv"]

    def export_spec(self) -> dict[str, Any]:
        caches = {name: nn.spec.Tensor(self._cache_shapes[name[0]], self.kv_cache)
                  for name in self.state_names()}  # fmt: skip
        return {
            "decode": {"token": nn.spec.Tensor([1], "int32"), "pos": int, **caches, "$": MODE},
            "prefill": {"tokens": nn.spec.Tensor([self.chunk], "int32"), "pos": int,
                        "n_valid": int, **caches, "$": MODE},
        }  # fmt: skip

    def task(self) -> dict[str, Any]:
        """How a runtime drives the entry points (the plan's `task`), and what each requires
        of its scalars and token ids (checked before any kernel runs: a position past the
        cache or a token past the embedding would read or write out of bounds)."""
        pos, n_valid, limit = var("pos"), var("n_valid"), self.max_context
        token_range = [0, self.vocab_size]
        return {
            "kind": "causal_lm",
            "max_context": limit,
            "chunk": self.chunk,
            "decode": {"function": "decode", "tokens": TOKENS["decode"], "position": "pos",
                       "token_range": token_range,
                       "requires": [op("ge", pos, 0), op("lt", pos, limit)]},
            "prefill": {"function": "prefill", "tokens": TOKENS["prefill"], "position": "pos",
                        "count": "n_valid", "token_range": token_range,
                        "requires": [op("ge", pos, 0), op("ge", n_valid, 1),
                                     op("le", n_valid, self.chunk),
                                     op("le", op("add", pos, n_valid), limit)]},
        }  # fmt: skip


def named_args(fn: Callable, names: list[str]) -> Callable:
    """`fn` as a method whose positional parameters are `names`: the exporter names an entry
    point's arguments after them (encoders share it)."""

    def method(*args):
        return fn(*args)

    kind = inspect.Parameter.POSITIONAL_ONLY
    method.__signature__ = inspect.Signature([inspect.Parameter(n, kind) for n in names])
    return method
