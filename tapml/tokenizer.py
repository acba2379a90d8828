"""Text <-> token ids: GGUF byte-level BPE and SentencePiece vocabularies, matching llama.cpp's
tokenizer, and a Hugging Face checkpoint's WordPiece tokenizer.json (BERT)."""

from __future__ import annotations

import codecs
import functools
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from . import sentencepiece
from .errors import TapmlError
from .fileio import write_atomic
from .sentencepiece import CONTROL, NORMAL, SPACE, UNKNOWN, USER_DEFINED, SentencePiece

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's: Llama 3's with lone digits
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
# The regexes llama.cpp (llama-vocab.cpp) uses for each tokenizer.ggml.pre value. It applies them
# in turn, each inside the pieces of the one before: for "smollm" the lone-digit pass runs first,
# so "  2" becomes "  " + "2", never " " + " 2" as the GPT-2 regex alone would give.
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"),
    "gpt-2": (_GPT2,),
    "gpt2": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),
    "starcoder": (r"\p{N}", _GPT2),
    "llama3": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    "llama-bpe": (_LLAMA3,),
    "qwen2": (_QWEN2,),
}
# llama.cpp takes a pre-token that is itself in the vocabulary whole, skipping the merges
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe"}
# end-of-turn tokens that stop generation like eos does (llama.cpp's end-of-generation list)
_STOP_TEXTS = {
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
}
_CONFIG_KEYS = {"model", "pre", "vocab_size", "bos_id", "eos_id", "stop_ids", "add_bos",
                "chat_template"}  # fmt: skip


class Tokenizer:
    """A GGUF vocabulary with its special ids and chat template, tokenizing as llama.cpp does:
    byte-level BPE (GGUF tokenizer model "gpt2": Llama 3, SmolLM2, Qwen2) as an HF `tokenizers`
    tokenizer, SentencePiece ("llama": Gemma) by tapml.sentencepiece (its HF form, which web
    bundles read, is loaded only if asked for); or a checkpoint's WordPiece tokenizer (BERT)."""

    def __init__(self, hf: HFTokenizer | Any, config: Mapping[str, Any],
                 spm: SentencePiece | None = None):  # fmt: skip
        """Prefer `from_gguf_metadata` or `load`; `config` has the keys of tokenizer_config.json.
        With `spm`, `hf` may be a function that gives the HF tokenizer when first needed."""
        self._hf_or_maker = hf
        self._spm = spm
        self._config = {key: config[key] for key in _CONFIG_KEYS}
        if spm is not None:
            self._control = {i for i, kind in enumerate(spm.types) if kind == CONTROL}
            self._added = self._control | {i for i, k in enumerate(spm.types) if k == USER_DEFINED}
        else:
            added = hf.get_added_tokens_decoder()
            self._control = {i for i, token in added.items() if token.special}
            self._added = set(added)
        self._piece_bytes = {"llama": _spm_bytes, "wordpiece": _wordpiece_bytes}.get(
            self._config["model"], _byte_level_bytes)
        self._bytes: dict[int, bytes] = {}  # each id's bytes, worked out when first needed

    @functools.cached_property
    def _hf(self) -> HFTokenizer:
        """The HF `tokenizers` form (for SentencePiece: made or read when first asked for)."""
        hf = self._hf_or_maker
        return hf() if callable(hf) else hf  # an HF tokenizer is not callable

    @property
    def control_ids(self) -> set[int]:
        """Ids of control tokens ("<|im_end|>", "<end_of_turn>"): markup, not text."""
        return set(self._control)

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer stored in a GGUF file's metadata (`GGUFFile.metadata`)."""
        model = metadata.get("tokenizer.ggml.model")
        if model not in ("gpt2", "llama") or "tokenizer.ggml.tokens" not in metadata:
            raise TapmlError(
                f"unsupported GGUF tokenizer {model!r}: tapml reads byte-level BPE ('gpt2') and "
                "SentencePiece ('llama') vocabularies"
            )
        tokens = list(metadata["tokenizer.ggml.tokens"])
        types = list(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        if len(types) != len(tokens):
            raise TapmlError(
                f"corrupt GGUF tokenizer: {len(tokens)} tokens but {len(types)} token types"
            )
        if model == "gpt2":
            # llama.cpp also falls back to "default" when the key is missing
            pre = str(metadata.get("tokenizer.ggml.pre", "default"))
            hf = _byte_level_bpe(tokens, metadata.get("tokenizer.ggml.merges", []), pre)
        else:
            pre = "spm"
            scores = list(metadata.get("tokenizer.ggml.scores", []))
            if len(scores) != len(tokens):
                raise TapmlError(
                    f"corrupt GGUF tokenizer: {len(tokens)} tokens but {len(scores)} scores"
                )
            space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
            spm = SentencePiece(tokens, scores, types, space_prefix)
        added = [AddedToken(text, special=kind == CONTROL, normalized=False)
                 for text, kind in zip(tokens, types, strict=True)
                 if kind in (CONTROL, USER_DEFINED)]  # fmt: skip
        if model == "gpt2":
            hf.add_tokens(added)
        eos_id = metadata.get("tokenizer.ggml.eos_token_id")
        stop_ids = {eos_id} if eos_id is not None else set()
        stop_ids |= {
            i
            for i, (text, kind) in enumerate(zip(tokens, types, strict=True))
            if kind == CONTROL and text in _STOP_TEXTS
        }
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            if key in metadata:
                stop_ids.add(metadata[key])
        config = {
            "model": model,
            "pre": pre,
            "vocab_size": len(tokens),
            "bos_id": metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_id": eos_id,
            "stop_ids": sorted(stop_ids),
            "add_bos": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
            "chat_template": metadata.get("tokenizer.chat_template"),
        }
        if model == "gpt2":
            return cls(hf, config)

        def hf_form() -> HFTokenizer:
            hf = _sentencepiece(tokens, scores, types, space_prefix)
            hf.add_tokens(added)
            return hf

        return cls(hf_form, config, spm)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """A checkpoint's WordPiece tokenizer.json (BERT): `encode` adds its [CLS] and [SEP]
        (the file's own post-processor); its truncation and padding are dropped, as the
        runtime pads and truncates to the compiled buckets."""
        path = Path(path)
        if not path.is_file():
            raise TapmlError(f"tokenizer file missing: {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TapmlError(f"{path} is not a valid tokenizer file: {e}") from e
        kind = json.loads(hf.to_str())["model"]["type"]
        if kind != "WordPiece":
            raise TapmlError(f"{path} is a {kind} tokenizer; tapml reads WordPiece tokenizer.json "
                             "files (GGUF files carry their own vocabularies)")  # fmt: skip
        hf.no_truncation()
        hf.no_padding()
        config = {"model": "wordpiece", "pre": "bert", "vocab_size": hf.get_vocab_size(),
                  "bos_id": hf.token_to_id("[CLS]"), "eos_id": hf.token_to_id("[SEP]"),
                  "stop_ids": [], "add_bos": False, "chat_template": None}  # fmt: skip
        return cls(hf, config)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """The tokenizer written by `save` into `directory`."""
        directory = Path(directory)
        tokenizer_path, config_path = directory / TOKENIZER_FILE, directory / CONFIG_FILE
        for path in (tokenizer_path, config_path):
            if not path.is_file():
                raise TapmlError(
                    f"tokenizer file missing: {path}; save the tokenizer there again "
                    "(recompile the model)"
                )
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            missing = _CONFIG_KEYS - config.keys()
        except (ValueError, AttributeError) as e:
            raise TapmlError(f"{config_path} is not a valid tokenizer config: {e}") from e
        if missing:
            raise TapmlError(f"{config_path} lacks the keys {', '.join(sorted(missing))}")
        spm_path = directory / sentencepiece.FILE
        if config["model"] == "llama" and spm_path.is_file():  # older artifacts lack it
            return cls(lambda: _read_hf(tokenizer_path), config, SentencePiece.load(spm_path))
        return cls(_read_hf(tokenizer_path), config)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json (HF format), tokenizer_config.json and, for SentencePiece,
        sentencepiece.json (what `load` reads) into `directory`."""
        directory = Path(directory)
        write_atomic(directory / TOKENIZER_FILE, self._hf.to_str().encode())
        if self._spm is not None:
            self._spm.save(directory / sentencepiece.FILE)
        config = json.dumps(self._config, indent=2, sort_keys=True, ensure_ascii=False)
        write_atomic(directory / CONFIG_FILE, (config + "\n").encode())

    @property
    def pre(self) -> str:
        """The GGUF's tokenizer.ggml.pre: which llama.cpp pre-tokenizer this matches."""
        return self._config["pre"]

    @property
    def add_bos(self) -> bool:
        return self._config["add_bos"]

    @property
    def chat_template(self) -> str | None:
        return self._config["chat_template"]

    @property
    def bos_id(self) -> int | None:
        return self._config["bos_id"]

    @property
    def eos_id(self) -> int | None:
        return self._config["eos_id"]

    @property
    def vocab_size(self) -> int:
        return self._config["vocab_size"]

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end generation: eos and the end-of-turn control tokens."""
        return list(self._config["stop_ids"])

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """The ids of `text`; special tokens written in it (e.g. "<|im_start|>") become one id."""
        if self._spm is not None:
            ids = self._encode_spm(text)
        else:  # a WordPiece tokenizer's special tokens frame every text ([CLS] ... [SEP])
            ids = self._hf.encode(text, add_special_tokens=self._config["model"] == "wordpiece").ids
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise TapmlError("cannot add a BOS token: this vocabulary has none")
            ids.insert(0, self.bos_id)
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """The ids of `text` as plain text: special tokens written in it are spelled out, never
        one id (what grammar engines tokenize forced text with)."""
        if self._spm is not None:  # user-defined pieces ("\t\t") are text: one id, as in encode
            return self._encode_spm(text, self._user_defined_pattern)
        hf = self._hf
        if hf.normalizer is not None:
            text = hf.normalizer.normalize_str(text)
        pieces = hf.pre_tokenizer.pre_tokenize_str(text) if hf.pre_tokenizer is not None \
            else [(text, None)]  # fmt: skip
        return [t.id for piece, _ in pieces for t in hf.model.tokenize(piece)]

    def _encode_spm(self, text: str, specials: re.Pattern | None = None) -> list[int]:
        """SentencePiece ids, the added tokens written in `text` (leftmost, longest first, as
        HF's added vocabulary finds them; `specials`: these only) one id each."""
        ids, start = [], 0
        for match in (specials or self._added_pattern).finditer(text):
            ids += self._spm.encode(text[start : match.start()])
            ids.append(self._spm.ids[match.group()])
            start = match.end()
        return ids + self._spm.encode(text[start:])

    @functools.cached_property
    def _added_pattern(self) -> re.Pattern:
        return _alternatives(self._spm.pieces[i] for i in self._added)

    @functools.cached_property
    def _user_defined_pattern(self) -> re.Pattern:
        return _alternatives(self._spm.pieces[i] for i in self._added - self._control)

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes: what it stands for in text (a control token's own text; b"" for an
        id the vocabulary lacks). Grammar engines match text against these."""
        return [self._bytes_of(i) for i in range(self.vocab_size)]

    def _bytes_of(self, token_id: int) -> bytes:
        data = self._bytes.get(token_id)
        if data is None:
            text = self._spm.pieces[token_id] if self._spm is not None \
                else self._hf.id_to_token(token_id)  # fmt: skip
            data = (b"" if text is None else text.encode() if token_id in self._added
                    else self._piece_bytes(text))  # fmt: skip
            self._bytes[token_id] = data
        return data

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """The text of `ids`; `skip_special` leaves out control tokens such as "<|im_end|>"."""
        data = b"".join(self._piece(i, skip_special) for i in ids)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The prompt for `messages` ({"role", "content"} dicts) in the model's chat format."""
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not self.chat_template:
            raise TapmlError(
                "this model has no chat template (tokenizer.chat_template in its GGUF); "
                "pass the prompt as plain text instead"
            )
        # the same environment settings as HF transformers, which the templates are written for
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._text(self.bos_id),
                eos_token=self._text(self.eos_id),
            )
        except TemplateError as e:
            raise TapmlError(f"the model's chat template failed: {e}") from e

    def _piece(self, token_id: int, skip_special: bool) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise TapmlError(
                f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        if skip_special and token_id in self._control:
            return b""
        return self._bytes_of(token_id)

    def _text(self, token_id: int | None) -> str:
        return "" if token_id is None else self._piece(token_id, False).decode(errors="replace")


class StreamDecoder:
    """Decodes ids one at a time, holding back a character whose bytes span several tokens."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """The text completed by `token_id`: "" while a character is still incomplete."""
        return self._utf8.decode(self._tokenizer._piece(token_id, self._skip_special))

    def flush(self) -> str:
        """The bytes still held back at the end, as replacement characters."""
        return self._utf8.decode(b"", final=True)


def _byte_level_bpe(tokens: list[str], merges: Sequence[str], pre: str) -> HFTokenizer:
    """GPT-2-style BPE over bytes shown as characters, after the named pre-tokenizer."""
    if pre not in PRE_TOKENIZERS:
        raise TapmlError(
            f"unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre in the GGUF); "
            f"tapml knows: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    vocab = {text: i for i, text in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    hf = HFTokenizer(
        models.BPE(vocab, pairs, byte_fallback=False, ignore_merges=pre in _IGNORE_MERGES)
    )
    splits = [pre_tokenizers.Split(Regex(r), "isolated") for r in PRE_TOKENIZERS[pre]]
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    return hf


def _sentencepiece(tokens: list[str], scores: list[float], types: list[int],
                   space_prefix: bool) -> HFTokenizer:  # fmt: skip
    """SentencePiece BPE as llama.cpp runs it: spaces shown as U+2581 (and one put before the
    text if `space_prefix`), then the adjacent pair whose joined piece scores highest merged
    first, over the whole text; bytes of characters outside the vocabulary as <0xNN>
    tokens. As merges: every split of a piece into two pieces, ranked by the piece's score."""
    vocab = {text: i for i, text in enumerate(tokens)}
    ranked = []
    for i, piece in enumerate(tokens):
        if types[i] != NORMAL:
            continue
        splits = [(piece[:at], piece[at:]) for at in range(1, len(piece))]
        splits = [(a, b) for a, b in splits if a in vocab and b in vocab]
        ranked += [(-scores[i], vocab[a], vocab[b], a, b) for a, b in splits]
    ranked.sort()
    unk = next((t for t, kind in zip(tokens, types, strict=True) if kind == UNKNOWN), None)
    hf = HFTokenizer(models.BPE(vocab, [(a, b) for *_, a, b in ranked], unk_token=unk,
                                byte_fallback=True, fuse_unk=True))  # fmt: skip
    replace = normalizers.Replace(" ", SPACE)
    hf.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if (
        space_prefix) else replace  # fmt: skip
    hf.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return hf


def _alternatives(texts) -> re.Pattern:
    """A pattern finding any of `texts`, the longest where several start at one place."""
    return re.compile("|".join(map(re.escape, sorted(set(texts), key=len, reverse=True)))
                      or r"(?!)")  # fmt: skip


def _read_hf(path: Path) -> HFTokenizer:
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise TapmlError(f"{path} is not a valid tokenizer file: {e}") from e


def _spm_bytes(piece: str) -> bytes:
    """The bytes a SentencePiece piece stands for: <0xNN> one byte, else its text."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace(SPACE, " ").encode()


def _wordpiece_bytes(piece: str) -> bytes:
    return piece.removeprefix("##").encode()


def _byte_level_bytes(piece: str) -> bytes:
    byte_of = _byte_decoder()
    return b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode() for c in piece)


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: character -> the byte it stands for."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})
    return {c: b for b, c in chars.items()}


def _raise_exception(message: str) -> None:
    raise TapmlError(f"the model's chat template refused the messages: {message}")
