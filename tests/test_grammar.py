"""Grammar constraints: masks on the real SmolLM2 tokenizer, errors, and constrained generation."""

import json
import re
import sys

import jsonschema
import numpy as np
import pytest

from tapml.errors import GenerationError, TapmlError
from tapml.gguf import GGUFFile
from tapml.models import MODELS
from tapml.runtime import grammar
from tapml.runtime.grammar import BACKENDS, make_constraint
from tapml.tokenizer import Tokenizer

MAX_TOKENS = 48


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_gguf_metadata(GGUFFile(MODELS["smollm2-135m"].gguf_path()).metadata)


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return grammar.Vocabulary.from_tokenizer(tokenizer)


def walk(constraint, tokenizer, text: str) -> bool:
    """Feed `text`'s tokens while the grammar allows each; did it allow them all?"""
    for token in tokenizer.encode(text):
        if not constraint.allowed()[token]:
            return False
        constraint.accept(token)
    return True


def test_vocabulary_is_the_tokens_raw_bytes(tokenizer, vocab):
    assert vocab.size == tokenizer.vocab_size == 49152
    text = "Grüße aus Köln! 東京 🚀"  # tokens that hold parts of one character
    ids = tokenizer.encode(text)
    assert any(vocab.tokens[i].decode(errors="ignore") == "" for i in ids)
    assert b"".join(vocab.tokens[i] for i in ids) == text.encode()
    assert vocab.tokens[2] == b"<|im_end|>" and {0, 1, 2} <= vocab.control
    assert vocab.stop_ids == (0, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regex_first_mask_allows_only_digits(tokenizer, vocab, backend):
    c = make_constraint("regex", "[0-9]{3}", tokenizer, backend)
    want = {i for i, t in enumerate(vocab.tokens) if t and len(t) <= 3 and t.isdigit()}
    assert set(np.nonzero(c.allowed())[0].tolist()) == want
    logits = np.random.default_rng(0).standard_normal(tokenizer.vocab_size).astype(np.float32)
    masked = c.mask(logits)
    assert masked.dtype == np.float32 and masked is not logits
    assert np.array_equal(np.isfinite(masked), c.allowed())
    assert np.array_equal(masked[sorted(want)], logits[sorted(want)])
    assert np.isfinite(logits).all()  # the input is left alone


@pytest.mark.parametrize("backend", BACKENDS)
def test_accept_walk_until_complete(tokenizer, backend):
    c = make_constraint("regex", "[0-9]{3}", tokenizer, backend)
    for digit, complete in zip("123", (False, False, True), strict=True):
        c.accept(tokenizer.encode(digit)[0])
        assert c.is_complete() == complete
    assert set(np.nonzero(c.allowed())[0].tolist()) == set(tokenizer.stop_ids)
    # an open-ended grammar is complete only once the model picks a stop token
    c = make_constraint("regex", "[0-9]+", tokenizer, backend)
    c.accept(tokenizer.encode("7")[0])
    assert not c.is_complete() and c.allowed()[tokenizer.eos_id]
    c.accept(tokenizer.eos_id)
    assert c.is_complete()


@pytest.mark.parametrize("backend", BACKENDS)
def test_disallowed_token_is_an_error(tokenizer, backend):
    c = make_constraint("regex", "[0-9]{3}", tokenizer, backend)
    with pytest.raises(GenerationError, match="not allowed by the"):
        c.accept(tokenizer.encode("a")[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_control_tokens_never_inside_grammar_text(tokenizer, vocab, backend):
    # the text "<|im_end|>" is spelled with ordinary tokens, never the control token
    c = make_constraint("regex", r"<\|im_end\|>", tokenizer, backend)
    assert not c.allowed()[sorted(vocab.control)].any()
    # anything goes: every ordinary token, and of the control tokens only the stop tokens (the
    # grammar may end here)
    c = make_constraint("regex", r"(.|\n)*", tokenizer, backend)
    allowed = c.allowed()
    assert {i for i in vocab.control if allowed[i]} == set(vocab.stop_ids)
    # every ordinary token but those that start inside a character (UTF-8 continuation bytes)
    refused = [t for i, t in enumerate(vocab.tokens) if i not in vocab.control and not allowed[i]]
    assert refused and all(0x80 <= t[0] < 0xC0 for t in refused)


@pytest.mark.parametrize("backend", BACKENDS)
def test_json_whitespace_is_json_dumps_separators_only(tokenizer, backend):
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})
    assert walk(make_constraint("json_schema", schema, tokenizer, backend), tokenizer, '{"a": 1}')
    for text in ('{"a":1}', '{ "a": 1}', '{"a":  1}', '{\n"a": 1}'):
        assert not walk(make_constraint("json_schema", schema, tokenizer, backend), tokenizer, text)
    any_json = make_constraint("any_json", None, tokenizer, backend)
    assert walk(any_json, tokenizer, '{"a": [1, {"b": null}], "c": "d"}')
    assert any_json.is_complete()
    assert not walk(make_constraint("any_json", None, tokenizer, backend), tokenizer, "[1]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gbnf_grammar(tokenizer, backend):
    gbnf = 'root ::= answer "!"\nanswer ::= "yes" | "no"'
    c = make_constraint("grammar", gbnf, tokenizer, backend)
    first = {tokenizer.decode([i]) for i in np.nonzero(c.allowed())[0]}
    assert first and all("yes".startswith(t) or "no".startswith(t) for t in first)
    assert walk(c, tokenizer, "yes!") and c.is_complete()
    assert not walk(make_constraint("grammar", gbnf, tokenizer, backend), tokenizer, "maybe!")


def test_padded_logits_are_masked(tokenizer):
    c = make_constraint("regex", "[0-9]", tokenizer)
    masked = c.mask(np.zeros(tokenizer.vocab_size + 64, np.float32))
    assert np.isneginf(masked[tokenizer.vocab_size :]).all()
    with pytest.raises(GenerationError, match="logits for a vocabulary"):
        c.mask(np.zeros(100, np.float32))


MALFORMED = [
    ("json_schema", "{not json"),
    ("json_schema", '{"type": "foo"}'),
    ("json_schema", '{"type": "string", "pattern": "[a-"}'),
    ("json_schema", '{"properties": {"a": {"$ref": "#/missing"}}}'),
    ("regex", "[0-9"),
    ("regex", "(ab"),
    ("grammar", "root ::= undefined-rule"),
    ("grammar", 'start ::= "a"'),  # no root rule
    ("grammar", 'root ::= "a'),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("kind", "value"), MALFORMED)
def test_malformed_input_is_rejected_at_make_time(tokenizer, backend, kind, value):
    with pytest.raises(TapmlError, match=r"^invalid (JSON schema|regex|GBNF grammar)"):
        make_constraint(kind, value, tokenizer, backend)


def test_bad_arguments(tokenizer):
    with pytest.raises(TapmlError, match="unknown grammar backend 'outlines'.*llguidance"):
        make_constraint("regex", "a", tokenizer, "outlines")
    with pytest.raises(TapmlError, match="unknown grammar kind 'lark'.*json_schema"):
        make_constraint("lark", "start: a", tokenizer)
    with pytest.raises(TapmlError, match="takes no value"):
        make_constraint("any_json", "{}", tokenizer)
    with pytest.raises(TapmlError, match="needs its text"):
        make_constraint("regex", None, tokenizer)


def test_missing_backend_names_the_install_command(tokenizer, monkeypatch):
    monkeypatch.setattr(grammar, "_CACHE", grammar.weakref.WeakKeyDictionary())
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar -> ImportError
    with pytest.raises(TapmlError, match=re.escape("pip install 'tapml[grammar-xgrammar]'")):
        make_constraint("regex", "a", tokenizer, "xgrammar")


def test_tokenizer_info_is_built_once(tokenizer):
    make_constraint("regex", "a", tokenizer)
    info = grammar._CACHE[tokenizer]["llguidance"]
    make_constraint("regex", "b", tokenizer)
    assert grammar._CACHE[tokenizer]["llguidance"] is info


# --- end to end on the real model ---------------------------------------------------------


def _obj(properties: dict, required=None, **extra) -> dict:
    required = list(properties) if required is None else required
    schema = {"type": "object", "properties": properties, "required": required}
    return {**schema, "additionalProperties": False, **extra}


NAME = {"type": "string", "maxLength": 12}
SCHEMAS = [
    ("Give a person named Alice, 30 years old.",
     _obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    ("Is the sky blue?", _obj({"answer": {"type": "boolean"}})),
    ("What is the capital of France?", _obj({"capital": NAME})),
    ("Pick a color.", _obj({"color": {"enum": ["red", "green", "blue"]}})),
    ("Rate this movie from 1 to 5.", _obj({"rating": {"type": "integer", "minimum": 1,
                                                      "maximum": 5}})),
    ("Give a temperature in Celsius.",
     _obj({"celsius": {"type": "number", "minimum": -50, "maximum": 60}})),
    ("List three fruits.",
     _obj({"fruits": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}})),
    ("Give a product code.",
     _obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}})),
    ("Describe a book: title and optional year.",
     _obj({"title": NAME, "year": {"type": "integer", "minimum": 1000, "maximum": 2100}},
          required=["title"])),
    ("Give a point on a plane.",
     _obj({"x": {"type": "integer", "minimum": -9, "maximum": 9},
           "y": {"type": "integer", "minimum": -9, "maximum": 9}})),
    ("Describe a user with an address.",
     _obj({"user": _obj({"name": NAME,
                         "address": _obj({"city": NAME,
                                          "zip": {"type": "string",
                                                  "pattern": "^[0-9]{5}$"}})})})),
    ("Give the status of a task.",
     _obj({"status": {"type": "string", "enum": ["todo", "doing", "done"]},
           "priority": {"type": "integer", "minimum": 1, "maximum": 3}})),
    ("Give two scores.",
     _obj({"scores": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                 "maximum": 100},
                      "minItems": 2, "maxItems": 2}})),
    ("Is 7 a prime number? Answer with a reason.",
     _obj({"prime": {"type": "boolean"}, "reason": {"type": "string", "maxLength": 20}})),
    ("Give a date.", _obj({"date": {"type": "string",
                                    "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]$"}})),
    ("Name a pet: optional nickname, required species.",
     _obj({"species": {"enum": ["cat", "dog", "fish"]}, "nickname": NAME},
          required=["species"])),
    ("Give a price in dollars.",
     _obj({"price": {"type": "number", "minimum": 0, "maximum": 1000}})),
    ("List up to two cities with their populations.",
     _obj({"cities": {"type": "array", "maxItems": 2,
                      "items": _obj({"name": NAME,
                                     "millions": {"type": "integer", "minimum": 0,
                                                  "maximum": 40}})}})),
    ("Give a yes or no answer and a confidence.",
     _obj({"answer": {"enum": ["yes", "no"]},
           "confidence": {"type": "number", "minimum": 0, "maximum": 1}})),
    ("Give a username.", _obj({"username": {"type": "string", "pattern": "^[a-z]{3,8}$"}})),
    ("Give a list of up to three tags.",
     _obj({"tags": {"type": "array", "items": {"enum": ["news", "sport", "tech"]},
                    "maxItems": 3}})),
    ("Give a nullable middle name.",
     _obj({"first": NAME, "middle": {"type": ["string", "null"], "maxLength": 8}})),
]  # fmt: skip
REGEXES = [
    ("Give a phone number.", r"[0-9]{3}-[0-9]{4}"),
    ("Is water wet? Answer yes or no.", r"(yes|no)"),
    ("Give a date.", r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"),
    ("Name a person.", r"[A-Z][a-z]{1,10} [A-Z][a-z]{1,10}"),
]
GBNF = r"""root ::= "The answer is " number "."
number ::= [1-9] [0-9]? [0-9]?
"""
GBNF_PYTHON = r"The answer is [1-9][0-9]{0,2}\."


@pytest.fixture(scope="module")
def engine(real_artifact):
    from tapml.runtime.engine import Engine

    return Engine(real_artifact("gguf"))


def constrained_greedy(engine, prompt: str, constraint) -> tuple[str, bool]:
    """The greedy reply to the chat `prompt` under `constraint`, and whether it completed.

    A loop of its own, so these tests do not depend on the engine's generation API."""
    tokenizer = engine.tokenizer
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
    engine.reset()
    logits, out = engine.prefill(ids), []
    for _ in range(MAX_TOKENS):
        token = int(np.argmax(constraint.mask(logits)))
        constraint.accept(token)
        if token in tokenizer.stop_ids:
            break
        out.append(token)
        if constraint.is_complete():
            break
        logits = engine.decode(token)
    return tokenizer.decode(out), constraint.is_complete()


@pytest.mark.real_model
@pytest.mark.parametrize("backend", BACKENDS)
def test_json_schemas_on_the_real_model(engine, backend):
    assert len(SCHEMAS) >= 20
    for prompt, schema in SCHEMAS:
        c = make_constraint("json_schema", json.dumps(schema), engine.tokenizer, backend)
        text, complete = constrained_greedy(engine, prompt, c)
        assert complete, f"{prompt!r}: incomplete after {MAX_TOKENS} tokens: {text!r}"
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.real_model
@pytest.mark.parametrize("backend", BACKENDS)
def test_any_json_regex_and_gbnf_on_the_real_model(engine, backend):
    c = make_constraint("any_json", None, engine.tokenizer, backend)
    text, complete = constrained_greedy(engine, "Describe a cat as JSON.", c)
    if complete:  # an open object may run past MAX_TOKENS; what there is must still be JSON
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")
    for prompt, regex in REGEXES:
        text, complete = constrained_greedy(
            engine, prompt, make_constraint("regex", regex, engine.tokenizer, backend)
        )
        assert complete and re.fullmatch(regex, text), (prompt, text)
    c = make_constraint("grammar", GBNF, engine.tokenizer, backend)
    text, complete = constrained_greedy(engine, "What is 6 times 7?", c)
    assert complete and re.fullmatch(GBNF_PYTHON, text), text
