"""Every JSON Schema keyword accounted for (enforced by the grammar, or checked after
generation with exit 1, or refused under --strict-schema), the generation defaults that let a
small model finish, the fallback between backends, and JSONSchemaBench files through the
benchmark's acceptance logic."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from conftest import bench_module

from tapml.errors import TapmlError
from tapml.gguf import GGUFFile
from tapml.models import MODELS
from tapml.runtime import grammar, schema
from tapml.runtime.grammar import BACKENDS, make_constraint
from tapml.tokenizer import Tokenizer

NODE = {"type": "object", "properties": {"c": {"$ref": "#/$defs/node"}},
        "additionalProperties": False}  # fmt: skip
# keyword -> (schema, a document that breaks it)
BROKEN = {
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
                    "[1, 1]"),
    "minItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, "[1]"),
    "maxItems": ({"type": "array", "items": {"type": "integer"}, "maxItems": 1}, "[1, 2]"),
    "pattern": ({"type": "string", "pattern": "^a+$"}, '"ab"'),
    "format": ({"type": "string", "format": "date"}, '"hello"'),
    "const": ({"const": 3}, "4"),
    "enum": ({"enum": ["a", 1]}, '"b"'),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, "true"),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, "true"),
    "allOf": ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "1"),
    "$ref": ({"$defs": {"a": {"type": "integer"}}, "$ref": "#/$defs/a"}, '"x"'),
    "$ref (recursive)": ({"$defs": {"node": NODE}, "$ref": "#/$defs/node"}, '{"c": {"d": 1}}'),
    "additionalProperties": ({"type": "object", "properties": {"a": {"type": "integer"}},
                              "additionalProperties": False}, '{"b": 1}'),
    "patternProperties": ({"type": "object", "patternProperties": {"^x": {"type": "integer"}}},
                          '{"x1": "s"}'),
    "contains": ({"type": "array", "items": {"type": "integer"}, "contains": {"minimum": 5}},
                 "[1, 2]"),
    "dependentRequired": ({"type": "object", "properties": {"a": {"type": "integer"},
                           "b": {"type": "integer"}}, "dependentRequired": {"a": ["b"]}},
                          '{"a": 1}'),
}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_gguf_metadata(GGUFFile(MODELS["smollm2-135m"].gguf_path()).metadata)


def allows(constraint, tokenizer, text: str) -> bool:
    """Does the grammar let `text` be written in full, and end there?"""
    for token in tokenizer.encode(text):
        if not constraint.allowed()[token]:
            return False
        constraint.accept(token)
    return constraint.is_complete()


def run_planted(monkeypatch, tmp_path, tokenizer, document, output: str, *options):
    """`tapml run` with the JSON schema `document`, whose model writes `output`."""
    from tapml.cli import main, run

    class Planted:
        finish_reason, max_context = "stop", 2048
        stats = SimpleNamespace(prompt_tokens=1, prefill_tok_s=1.0, decode_tokens=1,
                                decode_tok_s=1.0)  # fmt: skip

        def __init__(self):
            self.tokenizer = tokenizer

        def generate(self, *args, **kwargs):
            yield output

    monkeypatch.setattr(run, "load_engine", lambda *args, **kwargs: Planted())
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(document))
    return CliRunner().invoke(main, ["run", "smollm2-135m", "-p", "Answer in JSON.",
                                     "--json-schema", str(path), *options])  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keyword", BROKEN)
def test_each_keyword_is_enforced_or_checked_after_generation(
        keyword, backend, tokenizer, monkeypatch, tmp_path):  # fmt: skip
    document, broken = BROKEN[keyword]
    text = json.dumps(document)
    unenforced = schema.unenforced(document, backend)
    if not unenforced:  # the grammar enforces it: the broken document cannot be written
        constraint = make_constraint("json_schema", text, tokenizer, backend, defaults=schema.SPEC)
        assert not allows(constraint, tokenizer, broken)
        return
    name = keyword.split()[0]
    assert name in unenforced
    result = run_planted(monkeypatch, tmp_path, tokenizer, document, broken,
                         "--grammar-backend", backend)  # fmt: skip
    assert result.exit_code == 1, result.output
    assert broken in result.output  # the output is still shown
    assert "does not match the JSON schema" in result.output and name in result.output
    result = run_planted(monkeypatch, tmp_path, tokenizer, document, broken,
                         "--grammar-backend", backend, "--strict-schema")  # fmt: skip
    # strict refuses it, unless the generation bounds let the grammar enforce it (contains)
    refused = name in schema.unenforced(document, backend, schema.GENERATION)
    said = f"no grammar backend enforces {name}" if refused else "does not match the JSON schema"
    assert result.exit_code == 1 and said in result.output


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_keyword_applied_in_part_still_shapes_the_grammar(tokenizer, backend):
    document = json.dumps({"oneOf": [{"type": "integer"}, {"type": "string"}]})
    assert "oneOf" in schema.PARTIAL[backend]  # "exactly one" is checked after generation
    assert allows(make_constraint("json_schema", document, tokenizer, backend), tokenizer, '"a"')
    assert not allows(make_constraint("json_schema", document, tokenizer, backend), tokenizer,
                      "true")  # in no branch  # fmt: skip


def test_the_keywords_llguidance_refuses_no_longer_refuse_the_schema(tokenizer):
    document, _ = BROKEN["uniqueItems"]
    constraint = make_constraint("json_schema", json.dumps(document), tokenizer, "llguidance")
    assert constraint.post_checked == ["uniqueItems"]
    assert allows(constraint, tokenizer, "[1, 2]")
    assert constraint.violations("[1, 2]") == []


def test_a_valid_output_passes_the_check(tokenizer, monkeypatch, tmp_path):
    document, _ = BROKEN["uniqueItems"]
    result = run_planted(monkeypatch, tmp_path, tokenizer, document, "[1, 2]")
    assert result.exit_code == 0, result.output


def test_a_schema_one_backend_cannot_compile_falls_back_to_the_other(tokenizer, monkeypatch):
    real = grammar.compile_grammar

    def llguidance_fails(backend, *args, **kwargs):
        if backend == "llguidance":
            raise TapmlError("invalid JSON schema (llguidance): planted failure")
        return real(backend, *args, **kwargs)

    monkeypatch.setattr(grammar, "compile_grammar", llguidance_fails)
    document = json.dumps({"type": "integer"})
    assert make_constraint("json_schema", document, tokenizer).backend == "xgrammar"
    with pytest.raises(TapmlError, match="planted failure"):  # a backend named: no fallback
        make_constraint("json_schema", document, tokenizer, "llguidance")


def test_contains_is_enforced_under_the_generation_bound_on_arrays(tokenizer):
    document = {"type": "array", "items": {"type": "integer"}, "contains": {"minimum": 5}}
    assert "contains" in schema.unenforced(document, "llguidance")  # unbounded: checked after
    assert schema.unenforced(document, "llguidance", schema.GENERATION) == []
    assert "contains" in schema.unenforced(document, "xgrammar", schema.GENERATION)
    text = json.dumps(document)
    for output, valid in [("[1, 2, 3, 4]", False), ("[]", False), ("[7]", True),
                          ("[1, 2, 3, 9]", True), ("[1, 9, 2]", True),
                          ("[1, 2, 3, 4, 9]", False)]:  # the bound: 4 items  # fmt: skip
        constraint = make_constraint("json_schema", text, tokenizer, "llguidance")
        assert constraint.post_checked == []
        assert allows(constraint, tokenizer, output) == valid, output
    strict = make_constraint("json_schema", text, tokenizer, strict=True)  # strict: enforced
    assert strict.backend == "llguidance"
    with pytest.raises(TapmlError, match="no grammar backend enforces contains"):
        make_constraint("json_schema", text, tokenizer, defaults=schema.SPEC, strict=True)
    # minContains 0: any array; above 1, or a maxContains: checked after generation
    assert schema.unenforced({**document, "minContains": 0}, "llguidance", schema.GENERATION) == []
    for extra in ({"minContains": 2}, {"maxContains": 1}):
        assert "contains" in schema.unenforced({**document, **extra}, "llguidance",
                                               schema.GENERATION)  # fmt: skip


def test_generation_defaults_bound_strings_arrays_and_objects():
    document = {"type": "object", "properties": {
        "name": {"type": "string"}, "code": {"type": "string", "pattern": "^[A-Z]+$"},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "essay": {"type": "string", "maxLength": 32767},
        "short": {"type": "string", "maxLength": 8},
        "long": {"type": "string", "minLength": 100}, "free": {"type": "object"},
        "open": {"type": "object", "additionalProperties": {"type": "integer"}},
    }, "required": ["name", "extra"]}  # fmt: skip
    document["properties"]["list"] = {"type": "array", "items": {"type": "integer"}}
    document["properties"]["long_list"] = {"type": "array", "minItems": 10}
    document["properties"]["anything"] = {"description": "no type: any value"}
    document["properties"]["shaped"] = {"properties": {"x": {"type": "integer"}}}  # an object
    document["properties"]["bag"] = {"type": "object", "additionalProperties": True}
    out = schema.for_grammar(document, "llguidance", schema.Defaults(max_string_length=64))
    props = out["properties"]
    assert props["name"]["maxLength"] == 64 and props["code"]["maxLength"] == 64  # [A-Z]+
    assert "maxLength" not in props["zip"]  # a pattern of bounded length is its own bound
    assert props["essay"]["maxLength"] == 64 and props["short"]["maxLength"] == 8
    assert props["long"]["maxLength"] == 100  # never below the schema's own minimum
    assert out["additionalProperties"] is False and props["extra"]["maxLength"] == 64  # required
    assert props["free"]["additionalProperties"] is False
    assert props["list"]["maxItems"] == schema.MAX_ARRAY_ITEMS
    assert props["long_list"]["maxItems"] == 10
    assert props["open"]["additionalProperties"] == {"type": "integer"}  # the schema's own
    assert props["open"]["maxProperties"] == schema.MAX_ARRAY_ITEMS  # ...but not endless
    # any value: each type's bound applies to values of that type, one level deep too
    every = ["null", "boolean", "object", "array", "string", "number"]  # written out for XGrammar
    anything = {"type": every, "maxLength": 64, "maxItems": schema.MAX_ARRAY_ITEMS,
                "maxProperties": schema.MAX_ARRAY_ITEMS}  # fmt: skip
    assert props["anything"] == {"description": "no type: any value", "type": every,
                                 "maxLength": 64, "maxItems": schema.MAX_ARRAY_ITEMS,
                                 "items": anything, "properties": {},
                                 "additionalProperties": False}  # fmt: skip
    assert props["long_list"]["items"] == anything
    assert props["shaped"]["type"] == ["object"]
    assert props["bag"]["additionalProperties"] == anything
    assert schema.for_grammar(document, "llguidance", schema.SPEC)["properties"] == {
        **document["properties"], "extra": {}}  # as written, but for a required property


def test_objects_an_allof_joins_stay_open_to_each_others_properties(tokenizer):
    base = {"type": "object", "properties": {"a": {"type": "integer"}}}
    document = {"$defs": {"base": base}, "type": "object", "allOf": [
        {"$ref": "#/$defs/base"}, {"properties": {"b": {"type": "integer"}}, "required": ["b"]}]}
    out = schema.for_grammar(document, "llguidance", schema.GENERATION)
    assert "additionalProperties" not in out["$defs"]["base"]
    assert "additionalProperties" not in out["allOf"][1]
    constraint = make_constraint("json_schema", json.dumps(document), tokenizer, "llguidance")
    assert allows(constraint, tokenizer, '{"a": 1, "b": 2}')


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_oneof_grammar_refuses_types_that_two_branches_accept_whole(tokenizer, backend):
    """A string under two object schemas without a `type` is valid under both: it fails the
    oneOf, which the grammar reads as anyOf (JSONSchemaBench's bundleconfig, o58627)."""
    base = {"properties": {"x": {"type": "string"}}}
    document = {"definitions": {"base": base}, "type": "array", "items": {"oneOf": [
        {"allOf": [{"$ref": "#/definitions/base"}], "required": ["x"]},
        {"properties": {"y": {"type": "integer"}}, "additionalProperties": False}]}}
    out = schema.for_grammar(document, backend, schema.SPEC)
    assert out["items"]["type"] == ["object"]
    constraint = make_constraint("json_schema", json.dumps(document), tokenizer, backend)
    assert not allows(constraint, tokenizer, '["data"]')
    constraint = make_constraint("json_schema", json.dumps(document), tokenizer, backend)
    assert allows(constraint, tokenizer, '[{"x": "a"}]')
    # a branch with a type, an enum or a keyword for every type accepts no type whole
    for other in ({"type": "string"}, {"enum": [1, "a"]}, {"not": {"type": "null"}}):
        narrow = {"oneOf": [base, other]}
        assert "type" not in schema.for_grammar(narrow, backend, schema.SPEC), other


def test_required_properties_matched_by_a_pattern_are_listed_with_its_schema():
    document = {"type": "object", "required": ["name:en", "id"], "additionalProperties": False,
                "patternProperties": {"^name:(en|nl)$": {"type": "string"}}}  # fmt: skip
    out = schema.for_grammar(document, "xgrammar", schema.SPEC)  # it drops patternProperties
    assert "patternProperties" not in out
    assert out["properties"] == {"name:en": {"type": "string"}, "id": {}}


@pytest.mark.parametrize("backend", BACKENDS)
def test_numbers_stop_at_16_digits_in_each_part(tokenizer, backend):
    document = json.dumps({"type": "array", "items": {"type": "number"}})
    capped = make_constraint("json_schema", document, tokenizer, backend)
    assert allows(capped, tokenizer, "[" + "9" * 16 + "." + "1" * 16 + ", -1.5e10]")
    for text in ("[" + "9" * 17 + "]", "[1." + "1" * 17 + "]", "[1e" + "1" * 17 + "]"):
        capped = make_constraint("json_schema", document, tokenizer, backend)
        assert not allows(capped, tokenizer, text), text
    uncapped = make_constraint("json_schema", document, tokenizer, backend,
                               defaults=schema.SPEC)  # fmt: skip
    assert allows(uncapped, tokenizer, "[" + "9" * 40 + "]")
    strings = json.dumps({"type": "string"})
    for text, ok in [('"' + "1" * 16 + "-" + "1" * 16 + '"', True), ('"' + "1" * 17 + '"', False)]:
        assert allows(make_constraint("json_schema", strings, tokenizer, backend), tokenizer,
                      text) == ok, text  # fmt: skip
    digits_only = json.dumps({"type": "string", "pattern": "^[0-9]{20}$"})
    assert allows(make_constraint("json_schema", digits_only, tokenizer, backend), tokenizer,
                  '"' + "1" * 20 + '"')  # the schema's own need comes first  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_whitespace_on_request(tokenizer, backend):
    document = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})
    loose = make_constraint("json_schema", document, tokenizer, backend, whitespace="any")
    assert allows(loose, tokenizer, '{\n  "a" :1 }')
    compact = make_constraint("json_schema", document, tokenizer, backend)
    assert not allows(compact, tokenizer, '{\n  "a" :1 }')


@pytest.mark.real_model
def test_an_unbounded_integer_ends_within_256_tokens(real_artifact, tmp_path):
    from tapml.cli import main

    path = tmp_path / "schema.json"
    path.write_text(json.dumps({"type": "object", "properties": {"id": {"type": "integer"}},
                                "required": ["id"]}))  # fmt: skip
    model = str(real_artifact("gguf"))
    command = ["run", model, "-p", "Answer in JSON.", "--json-schema", str(path), "-n", "256"]
    looping = CliRunner().invoke(main, [*command, "--max-number-digits", "0"])
    assert looping.exit_code == 1 and "--max-tokens ran out" in looping.output  # SmolLM2 loops
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout.splitlines()[0])
    assert 0 < len(str(document["id"])) <= 16


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_value_without_a_type_gets_the_bounds_of_each_type(tokenizer, backend):
    document = json.dumps({"type": "object", "properties": {"a": {}}, "required": ["a"]})
    for output, valid in [('{"a": "' + "x" * 65 + '"}', False), ('{"a": "xyz"}', True),
                          ('{"a": [1, 2, 3, 4, 5]}', False), ('{"a": [1, 2]}', True),
                          ('{"a": 7}', True)]:  # fmt: skip
        constraint = make_constraint("json_schema", document, tokenizer, backend)
        assert allows(constraint, tokenizer, output) == valid, output


@pytest.mark.real_model
def test_a_value_without_a_type_ends_within_256_tokens(real_artifact, tmp_path):
    """JSONSchemaBench's BFCL_java_71: SmolLM2 writes a string "1.0.0.0..." as the value the
    schema leaves open, until --max-tokens runs out, unless --max-string-length bounds it."""
    from tapml.cli import main

    name = "CoroutineManager.co_exit_to"
    call = {"type": "object", "properties": {"arg_object": {}, "this": {"type": "integer"}},
            "required": ["arg_object", "this"], "additionalProperties": False}  # fmt: skip
    path = tmp_path / "schema.json"
    path.write_text(json.dumps({"type": "object", "properties": {name: call}, "required": [name]}))
    command = ["run", str(real_artifact("gguf")), "-p", "Answer in JSON.", "--json-schema",
               str(path), "-n", "256"]  # fmt: skip
    looping = CliRunner().invoke(main, [*command, "--max-string-length", "0"])
    assert looping.exit_code == 1 and "--max-tokens ran out" in looping.output
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout.splitlines()[0])
    value = document[name]["arg_object"]
    assert len(json.dumps(value)) <= 64 + 2, value


SAMPLE = Path(__file__).parent.parent.parent / "shared" / "jsonschemabench"
FILES = ["BFCL_java_27.json", "Glaiveai2K---analyze_health_data_ecfa5553.json",
         "Handwritten---dep10.json",  # dependentRequired: llguidance refuses it
         "Synthesized---draft2019_09_nonvalid_additionalProperties_id10_subschema1_not_2.json"]


def test_jsonschemabench_files_through_the_acceptance_logic(tokenizer):
    if not SAMPLE.is_dir():
        pytest.skip(f"no JSONSchemaBench sample at {SAMPLE}")
    bench = bench_module("jsonschemabench")
    names = [p.name for p in sorted(SAMPLE.glob("*.json"))]
    chosen = [n for n in FILES if n in names] or names[:4]
    documents = {n: json.loads((SAMPLE / n).read_text()) for n in chosen}
    results = {n: bench.run_file(d, tokenizer) for n, d in documents.items()}
    summary = bench.summarize(results)
    for name, r in results.items():
        assert r["tapml"]["passed"], f"{name}: {r['tapml']}"
        for engine in bench.ENGINES:
            if r[engine]["compiled"] and documents[name]["tests"]:
                assert r[engine]["mask_s"], f"{name}: {engine} judged no token"
    assert summary["tapml"]["passed"] > summary["llguidance"]["passed"]
