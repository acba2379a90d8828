"""Grammar-constrained generation: JSON schema, regex and GBNF token masks from two backends.

`make_constraint(kind, value, tokenizer, backend)` compiles the grammar (errors surface here,
before any model runs) and returns a `Constraint` (runtime/constraint.py). Backends:

- "llguidance" (default): a small Rust wheel with a numpy API.
- "xgrammar": the XGrammar engine; an optional extra, since importing it imports torch and
  transformers: `pip install 'tapml[grammar-xgrammar]'`.

JSON whitespace is set the same for both: by default the separators of Python's `json.dumps`
(", " between items, ": " after keys) and no other whitespace anywhere, so the model cannot
stall in runs of newlines and the output is one line; `whitespace="any"` accepts any JSON
whitespace (documents serialized by others). A JSON schema goes through runtime/schema.py
first: keywords the backend does not enforce are checked after generation instead, and the
generation defaults are added. With no backend named, llguidance compiles the grammar, and
xgrammar when llguidance cannot.
"""

from __future__ import annotations

import json
import logging
import re
import weakref
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np

from tapml.errors import GenerationError, TapmlError
from tapml.tokenizer import Tokenizer

from . import schema
from .schema import Defaults, NumberDigits, violations

log = logging.getLogger("tapml")

KINDS = ("json_schema", "any_json", "regex", "grammar")
FALLBACK = ("llguidance", "xgrammar")  # the backends tried, in turn, when none is named
JSON_SEPARATORS = (", ", ": ")  # item, key; as json.dumps writes them
ANY_JSON_SCHEMA = '{"type": "object"}'  # "any_json": any JSON object, like OpenAI's json_object


@dataclass(frozen=True)
class Vocabulary:
    """Each token's raw bytes, and which ids are control tokens and which stop generation."""

    tokens: list[bytes]
    control: frozenset[int]
    stop_ids: tuple[int, ...]
    eos_id: int | None
    bos_id: int | None

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> Vocabulary:
        # Control tokens ("<|im_end|>") are literal text marked special; ids missing from the
        # vocabulary count as control too, so that no grammar text can ever produce them.
        tokens = tokenizer.token_bytes()
        control = tokenizer.control_ids | {
            i for i, t in enumerate(tokens) if not t
        }
        stop = set(tokenizer.stop_ids) | ({tokenizer.eos_id} - {None})
        return cls(
            tokens=tokens,
            control=frozenset(control),
            stop_ids=tuple(sorted(stop)),
            eos_id=tokenizer.eos_id,
            bos_id=tokenizer.bos_id,
        )

    @property
    def size(self) -> int:
        return len(self.tokens)

    @cached_property
    def leading_digits(self) -> np.ndarray:
        """How many ASCII digits each token starts with."""
        return np.array([len(t) - len(t.lstrip(b"0123456789")) for t in self.tokens])


class GrammarConstraint:
    """A compiled grammar's state; implements `Constraint`. Backends fill in the hooks."""

    backend = ""  # its key in BACKENDS
    install = ""  # the command that installs its package

    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab
        self.schema: Any = None  # a JSON schema's original, which the output is checked against
        self.post_checked: list[str] = []  # its keywords this backend leaves to that check
        self.digits: NumberDigits | None = None  # the cap on a JSON number's digits
        words = (vocab.size + 31) // 32
        self._bitmask = np.zeros((1, words), np.int32)  # bit i of word w: token 32 * w + i
        self._fresh = False  # _bitmask holds the mask for the current state
        self._stopped = False  # a stop token was accepted
        # every vocabulary token but the stop tokens: "only stop tokens allowed" is a zero AND
        keep = np.ones(words * 32, np.uint8)
        keep[vocab.size :] = 0
        keep[list(vocab.stop_ids)] = 0
        self._non_stop = np.packbits(keep, bitorder="little").view(np.int32)

    def allowed(self) -> np.ndarray:
        """One bool per vocabulary token: may it come next?"""
        bitmask = self.bitmask()
        bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little", count=self.vocab.size)
        allowed = bits.view(np.bool_)
        capped = self.digits.allowed() if self.digits is not None else None
        if capped is not None and (allowed & capped).any():  # the schema may need the digits
            allowed = allowed & capped
        return allowed

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A float32 copy of `logits` with -inf for every token the grammar does not allow next;
        logits past the vocabulary (padding) are -inf too."""
        allowed = self.allowed()
        logits = np.asarray(logits, np.float32)
        if logits.shape[-1] < allowed.size:
            raise GenerationError(
                f"{logits.shape[-1]} logits for a vocabulary of {allowed.size} tokens"
            )
        if logits.shape[-1] > allowed.size:
            pad = np.zeros(logits.shape[-1] - allowed.size, np.bool_)
            allowed = np.concatenate([allowed, pad])
        return np.where(allowed, logits, np.float32(-np.inf))

    def accept(self, token: int) -> None:
        """Advance by `token`; a GenerationError if the grammar does not allow it here."""
        error = self._consume(int(token))
        if error is not None:
            piece = self.vocab.tokens[token] if 0 <= token < self.vocab.size else b"?"
            raise GenerationError(
                f"token {token} ({piece!r}) is not allowed by the {self.backend} grammar here: "
                f"{error}"
            )
        self._fresh = False
        self._stopped = token in self.vocab.stop_ids
        if self.digits is not None:
            self.digits.accept(token)

    def reset(self) -> None:
        """Back to the start of the grammar (no text generated)."""
        self._matcher.reset()
        self._fresh = self._stopped = False
        if self.digits is not None:
            self.digits = NumberDigits(self.vocab, self.digits.limit)

    def violations(self, output: str) -> list[str]:
        """What makes a finished JSON output fail its schema (runtime/schema.py); empty for
        other grammars."""
        return [] if self.schema is None else violations(output, self.schema)

    def is_complete(self) -> bool:
        """True once a stop token was accepted, or the grammar is satisfied and allows nothing
        more than a stop token."""
        if self._stopped:
            return True
        if not self._accepting():
            return False
        # the next mask, which mask() then reuses
        return not np.any(self.bitmask()[0] & self._non_stop)

    def bitmask(self) -> np.ndarray:
        """The grammar's own mask of the next tokens, packed: bit i of int32 word w allows token
        32 * w + i (computed once per state)."""
        if not self._fresh:
            self._fill(self._bitmask)
            self._fresh = True
        return self._bitmask

    # hooks
    def _fill(self, bitmask: np.ndarray) -> None:
        """Write the allowed tokens of the current state into `bitmask` (int32, (1, words))."""
        raise NotImplementedError(f"{type(self).__name__} lacks _fill")

    def _consume(self, token: int) -> str | None:
        """Advance by `token`; None, or why it was refused."""
        raise NotImplementedError(f"{type(self).__name__} lacks _consume")

    def _accepting(self) -> bool:
        """Does the text so far satisfy the grammar?"""
        raise NotImplementedError(f"{type(self).__name__} lacks _accepting")


class LLGuidanceConstraint(GrammarConstraint):
    backend = "llguidance"
    install = "pip install 'llguidance>=1.0' (a dependency of tapml: reinstall tapml)"

    @staticmethod
    def tokenizer_info(vocab: Vocabulary, tokenizer: Tokenizer):
        import llguidance

        class Wrapped:  # what llguidance.TokenizerWrapper reads
            eos_token_id, bos_token_id = vocab.eos_id, vocab.bos_id
            tokens, special_token_ids = vocab.tokens, sorted(vocab.control)

            def __call__(self, text: str) -> list[int]:
                # llguidance tokenizes the text a grammar forces with this. It must never give
                # control ids: the added tokens that Tokenizer.encode parses are spelled out
                if not isinstance(text, str):
                    raise TypeError("encodes str only")  # llguidance then passes str
                return tokenizer.encode_ordinary(text)

        wrapper = llguidance.TokenizerWrapper(Wrapped())
        return llguidance.LLTokenizer(wrapper, n_vocab=vocab.size, eos_token=list(vocab.stop_ids))

    def __init__(self, info, vocab: Vocabulary, kind: str, value: str, whitespace: str):
        import llguidance
        from llguidance.gbnf_to_lark import gbnf_to_lark

        super().__init__(vocab)
        try:
            if kind == "regex":
                grammar = llguidance.LLMatcher.grammar_from_regex(value)
            elif kind == "grammar":
                grammar = llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(value))
            else:
                options = {"whitespace_flexible": True} if whitespace == "any" else {
                    "whitespace_flexible": False,
                    "item_separator": JSON_SEPARATORS[0],
                    "key_separator": JSON_SEPARATORS[1],
                }  # fmt: skip
                # oneOf whose branches may overlap is read as anyOf (it is refused otherwise);
                # runtime/schema.py checks the "exactly one" after generation
                options["coerce_one_of"] = True
                grammar = llguidance.LLMatcher.grammar_from_json_schema(value, overrides=options)
        except Exception as e:  # the GBNF converter raises bare Exceptions
            raise _invalid(kind, self.backend, str(e)) from e
        # the matcher never raises for a bad grammar: it starts in an error state instead
        self._matcher = llguidance.LLMatcher(info, grammar, log_level=0)
        if self._matcher.is_error():
            raise _invalid(kind, self.backend, self._matcher.get_error())

    def _fill(self, bitmask):
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self._matcher, bitmask)

    def _consume(self, token):
        if self._matcher.consume_token(token):
            return None
        return self._matcher.get_error().split("\n")[0]  # the rest dumps the parser's state

    def _accepting(self):
        return self._matcher.is_accepting()


class XGrammarConstraint(GrammarConstraint):
    backend = "xgrammar"
    install = "pip install 'tapml[grammar-xgrammar]'"

    @staticmethod
    def tokenizer_info(vocab: Vocabulary, tokenizer: Tokenizer):
        import xgrammar

        # xgrammar counts empty tokens as special: never allowed by grammar text
        tokens = [b"" if i in vocab.control else t for i, t in enumerate(vocab.tokens)]
        info = xgrammar.TokenizerInfo(
            tokens,
            xgrammar.VocabType.RAW,
            vocab_size=vocab.size,
            stop_token_ids=list(vocab.stop_ids),
        )
        return xgrammar.GrammarCompiler(info)  # holds the info and a cache of compiled grammars

    def __init__(self, compiler, vocab: Vocabulary, kind: str, value: str, whitespace: str):
        super().__init__(vocab)
        try:
            if kind == "regex":
                compiled = compiler.compile_regex(value)
            elif kind == "grammar":
                compiled = compiler.compile_grammar(value)
            elif whitespace == "any":
                compiled = compiler.compile_json_schema(value, any_whitespace=True,
                                                        strict_mode=False)  # fmt: skip
            else:
                compiled = compiler.compile_json_schema(
                    value, any_whitespace=False, separators=JSON_SEPARATORS, strict_mode=False
                )
        except RuntimeError as e:
            # "[08:41:34] /project/cpp/regex_converter.cc:83: Regex parsing error ..."
            raise _invalid(kind, self.backend, re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e))) from e
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(compiled)

    def _fill(self, bitmask):
        self._matcher.fill_next_token_bitmask(bitmask)  # numpy arrays go through DLPack

    def _consume(self, token):
        return None if self._matcher.accept_token(token) else "refused by the matcher"

    def _accepting(self):
        return self._matcher.is_completed()


BACKENDS: dict[str, type[GrammarConstraint]] = {
    "llguidance": LLGuidanceConstraint,
    "xgrammar": XGrammarConstraint,
}
# per tokenizer, built once: its Vocabulary ("vocab") and each backend's tokenizer info
_CACHE: weakref.WeakKeyDictionary[Tokenizer, dict[str, object]] = weakref.WeakKeyDictionary()


def make_constraint(
    kind: str, value: str | None, tokenizer: Tokenizer, backend: str | None = None, *,
    defaults: Defaults = schema.GENERATION, whitespace: str = "compact", strict: bool = False,
) -> GrammarConstraint:  # fmt: skip
    """A constraint that lets generation produce only text of the grammar.

    kind: "json_schema" (value: the schema as JSON text), "any_json" (value: None; any JSON
    object), "regex" (value: the regex, matched in full) or "grammar" (value: GBNF, the EBNF
    dialect of llama.cpp and xgrammar, with a rule named "root"). backend: a key of BACKENDS,
    or None for the first of FALLBACK that compiles the grammar. For JSON: `defaults` are the
    generation defaults (runtime/schema.py; schema.SPEC: none), `whitespace` "compact" or
    "any", and `strict` refuses a schema with keywords the backend cannot enforce. A malformed
    value raises TapmlError with the backend's message.
    """
    if kind not in KINDS:
        raise TapmlError(f"unknown grammar kind {kind!r}; tapml knows: {', '.join(KINDS)}")
    if backend is not None and backend not in BACKENDS:
        raise TapmlError(f"unknown grammar backend {backend!r}; tapml knows: {', '.join(BACKENDS)}")
    if whitespace not in ("compact", "any"):
        raise TapmlError(f"whitespace is 'compact' or 'any', not {whitespace!r}")
    if kind == "any_json":
        if value is not None:
            raise TapmlError("the 'any_json' grammar takes no value")
        value = ANY_JSON_SCHEMA
        defaults = replace(defaults, extra_properties=True)  # any object: any properties
    elif not isinstance(value, str):
        raise TapmlError(f"the {kind!r} grammar needs its text as a str, got {value!r}")
    document = schema.load(value) if kind in ("json_schema", "any_json") else None
    candidates = [backend] if backend else list(FALLBACK)
    if strict and document is not None:
        able = [b for b in candidates if not schema.unenforced(document, b, defaults)]
        if not able:
            missing = schema.unenforced(document, candidates[0], defaults)
            raise TapmlError(
                f"--strict-schema: no grammar backend enforces {', '.join(missing)} "
                f"({' or '.join(candidates)} tried); without --strict-schema the output is "
                "checked against them after generation"
            )
        candidates = able
    errors = []
    for name in candidates:
        text = value if document is None else json.dumps(
            schema.for_grammar(document, name, defaults))  # fmt: skip
        try:
            constraint = compile_grammar(name, kind, text, tokenizer, whitespace)
        except TapmlError as e:
            if len(candidates) == 1:  # a backend named, or the only one strict allows
                raise
            errors.append(str(e))
            continue
        if document is not None:
            constraint.schema = document
            constraint.post_checked = schema.unenforced(document, name, defaults)
            if defaults.max_number_digits:
                constraint.digits = NumberDigits(constraint.vocab, defaults.max_number_digits)
        if errors:
            log.info("grammar: %s compiles it; %s", name, "; ".join(errors))
        else:
            log.debug("grammar: %s compiles it", name)
        if constraint.post_checked:
            log.info("grammar: %s does not enforce %s; the output is checked against them "
                     "after generation", name, ", ".join(constraint.post_checked))  # fmt: skip
        return constraint
    raise TapmlError("; ".join(errors))


def compile_grammar(backend: str, kind: str, value: str, tokenizer: Tokenizer,
                    whitespace: str = "compact") -> GrammarConstraint:  # fmt: skip
    """`backend`'s constraint of the grammar exactly as given (make_constraint prepares JSON
    schemas first); its tokenizer info is built once per tokenizer."""
    cls = BACKENDS[backend]
    cache = _CACHE.setdefault(tokenizer, {})
    if "vocab" not in cache:
        cache["vocab"] = Vocabulary.from_tokenizer(tokenizer)
    if backend not in cache:
        try:
            cache[backend] = cls.tokenizer_info(cache["vocab"], tokenizer)
        except ImportError as e:
            raise TapmlError(
                f"the {backend} grammar backend is not installed ({e}); install it with: "
                f"{cls.install}"
            ) from e
    return cls(cache[backend], cache["vocab"], kind, value, whitespace)


def _invalid(kind: str, backend: str | None, message: str) -> TapmlError:
    what = {"json_schema": "JSON schema", "any_json": "JSON grammar", "regex": "regex"}
    by = f" ({backend})" if backend else ""
    return TapmlError(f"invalid {what.get(kind, 'GBNF grammar')}{by}: {message.strip()}")
