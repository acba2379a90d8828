"""JSON Schema for generation: every keyword accounted for, and defaults that let a model finish.

A schema's validation keywords are each either enforced by the grammar backend that runs
(`ENFORCED`, measured per backend: a violating document cannot be generated) or checked on the
finished output (`violations`, with the `jsonschema` package). Those a backend does not apply
at all are taken out of the schema it compiles, so that it does not refuse the schema
(llguidance does, for `uniqueItems`); those it applies in part (`PARTIAL`) stay in it. A strict
caller refuses any keyword not enforced, up front.

Generation defaults (`Defaults`) bound what a small model can loop on: strings and arrays get
a maximum length where the schema allows longer ones (or sets none), objects allow only the
properties the schema names (XGrammar's strict mode), and runs of digits at most 16 (each part
of a number, as llama.cpp's schema converter bounds them, and inside strings), applied to the
token mask by `NumberDigits` since JSON Schema cannot say it. Each narrows the documents the
schema allows, never widens them, and gives way where the schema needs more.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tapml.errors import TapmlError

# What each backend's grammar enforces, besides the structure itself (type, properties, items):
# tests/test_json_schema.py tries to break each one and cannot.
_COMMON = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "minItems", "maxItems", "enum", "const", "anyOf", "$ref", "$defs", "definitions",
    "minLength", "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minProperties", "maxProperties",
}  # fmt: skip
ENFORCED = {
    "llguidance": _COMMON | {"allOf", "multipleOf", "patternProperties"},
    "xgrammar": _COMMON,  # it mishandles patternProperties (its log says what it drops)
}
# What each backend applies in part: given to its grammar, and checked after generation too.
# Both read a oneOf whose branches may overlap as anyOf; XGrammar applies allOf with one
# branch only and multipleOf to integers only.
PARTIAL = {"llguidance": {"oneOf"}, "xgrammar": {"oneOf", "allOf", "multipleOf"}}
# JSON Schema's validation keywords (drafts 4 to 2020-12), enforced or checked.
VALIDATION = {
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum",
    "exclusiveMinimum", "maxLength", "minLength", "pattern", "format", "maxItems", "minItems",
    "uniqueItems", "maxContains", "minContains", "contains", "maxProperties", "minProperties",
    "required", "dependentRequired", "dependencies", "dependentSchemas", "allOf", "anyOf",
    "oneOf", "not", "if", "then", "else", "prefixItems", "items", "additionalItems",
    "properties", "patternProperties", "additionalProperties", "propertyNames",
    "unevaluatedItems", "unevaluatedProperties", "$ref", "$dynamicRef", "$recursiveRef",
}  # fmt: skip
# Keywords that say nothing about validity, passed to the backends as they are.
ANNOTATIONS = {
    "$schema", "$id", "$anchor", "$comment", "$vocabulary", "$dynamicAnchor", "title",
    "description", "default", "examples", "deprecated", "readOnly", "writeOnly",
    "contentEncoding", "contentMediaType", "contentSchema",
}  # fmt: skip
# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
_ONE = ("additionalProperties", "items", "additionalItems", "not", "if", "then", "else",
        "contains", "propertyNames", "unevaluatedProperties", "unevaluatedItems")  # fmt: skip
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_COMBINATORS = ("allOf", "anyOf", "oneOf")  # what joins one schema's object to another's

MAX_NUMBER_DIGITS = 16  # in each part of a number, as llama.cpp's converter bounds them
MAX_STRING_LENGTH = 64
MAX_ARRAY_ITEMS = 4
MAX_CONTAINS_POSITIONS = 16  # where generation may place the item an array's `contains` asks for


# a `transform` step: (subschema, where) -> its replacement
Step = Callable[[dict[str, Any], str], dict[str, Any]]


@dataclass(frozen=True)
class Defaults:
    """What generation adds to a schema so that a small model finishes (0 / True: off)."""

    max_string_length: int = MAX_STRING_LENGTH
    max_number_digits: int = MAX_NUMBER_DIGITS
    extra_properties: bool = False
    max_array_items: int = MAX_ARRAY_ITEMS


GENERATION = Defaults()
# the schema as written: no bound added
SPEC = Defaults(max_string_length=0, max_number_digits=0, extra_properties=True,
                max_array_items=0)  # fmt: skip


def load(text: str) -> dict[str, Any] | bool:
    """The schema in `text`; a TapmlError when it is not JSON or not a schema."""
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise TapmlError(f"invalid JSON schema: not valid JSON: {e}") from e
    if not isinstance(schema, (dict, bool)):
        raise TapmlError(f"invalid JSON schema: a schema is an object or a boolean, not "
                         f"{type(schema).__name__}")  # fmt: skip
    return schema


def transform(schema: Any, fn: Step, where: str = "") -> Any:
    """A copy of `schema` with `fn(subschema, where)` applied to every subschema, innermost
    first; `where` is "branch" for a branch of an allOf, anyOf or oneOf, "definition" for one
    of $defs or definitions, else ""."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _ONE:
        if isinstance(out.get(key), dict):
            out[key] = transform(out[key], fn)
    for key in _LIST:
        if isinstance(out.get(key), list):
            inner = "branch" if key in _COMBINATORS else ""
            out[key] = [transform(s, fn, inner) for s in out[key]]
    for key in _MAP:
        if isinstance(out.get(key), dict):
            inner = "definition" if key in ("$defs", "definitions") else ""
            out[key] = {name: transform(s, fn, inner) for name, s in out[key].items()}
    return fn(out, where)


def keywords(schema: Any) -> set[str]:
    """Every keyword used anywhere in `schema`."""
    found: set[str] = set()

    def collect(s: dict[str, Any], _: str) -> dict[str, Any]:
        found.update(s)
        return s

    transform(schema, collect)
    return found


def unenforced(schema: Any, backend: str, defaults: Defaults = SPEC) -> list[str]:
    """The validation keywords of `schema` that `backend`'s grammar does not enforce under the
    generation `defaults`."""
    placed = transform(schema, _place_contains(backend, defaults))
    return sorted((keywords(placed) & VALIDATION) - ENFORCED[backend])


def for_grammar(schema: Any, backend: str, defaults: Defaults) -> Any:
    """The schema `backend` compiles: without the keywords it does not enforce (checked after
    generation instead) or does not know (vendor extensions), and with the generation
    `defaults`."""
    original = schema
    schema = copy.deepcopy(schema)
    for step in (_one_of_types(original), _place_contains(backend, defaults), _describe_required):
        schema = transform(schema, step)
    used = keywords(schema)
    dropped = used - ENFORCED[backend] - PARTIAL[backend] - ANNOTATIONS

    def rewrite(s: dict[str, Any], where: str) -> dict[str, Any]:
        # an object joined with others (a combinator's branch, one with a combinator of its
        # own, a definition where combinators are used) must stay open to their properties
        joined = (where == "branch" or bool({*_COMBINATORS, "$ref"} & s.keys())
                  or (where == "definition" and bool(used.intersection(_COMBINATORS))))  # fmt: skip
        s = {k: v for k, v in s.items() if k not in dropped}
        # a schema without a type (`{}`, a property the schema only requires) gets the types
        # its keywords are for (as XGrammar reads it: `properties` make an object), else all;
        # the bounds of each apply, and XGrammar applies none to a schema without a type
        if "type" not in s and not joined and not {"enum", "const", "not"} & s.keys() \
                and (defaults.max_string_length or defaults.max_array_items):  # fmt: skip
            s["type"] = [t for t in _TYPES if _APPLIES_TO.get(t, set()) & s.keys()] or list(_TYPES)
        types = s.get("type") if isinstance(s.get("type"), list) else [s.get("type")]
        cap = defaults.max_string_length
        if cap and "string" in types and _longer_string(s, cap):
            s["maxLength"] = max(cap, s.get("minLength", 0))
        cap = defaults.max_array_items
        if cap and ("array" in types or "items" in s) and s.get("maxItems", cap + 1) > cap \
                and not {"enum", "const"} & s.keys():  # fmt: skip
            s["maxItems"] = _array_bound(s, cap)
            if s.get("items", True) is True and not {"prefixItems", "additionalItems"} & s.keys():
                s["items"] = _any_value(defaults)
        is_object = "object" in types or "properties" in s
        open_ended = s.get("additionalProperties", True) is not False or "patternProperties" in s
        if not defaults.extra_properties and is_object and not joined and not (
                {"additionalProperties", "patternProperties"} & s.keys()):  # fmt: skip
            s["properties"], s["additionalProperties"] = s.get("properties", {}), False
        elif defaults.max_array_items and is_object and open_ended and not (
                {"maxProperties", "enum", "const"} & s.keys() or joined):  # fmt: skip
            # properties the schema does not name, as many as an array's items
            s["maxProperties"] = max(len(s.get("properties", {})) + defaults.max_array_items,
                                     s.get("minProperties", 0))  # fmt: skip
            if s.get("additionalProperties", True) is True:
                s["additionalProperties"] = _any_value(defaults)
        return s

    return transform(schema, rewrite)


def _array_bound(s: dict[str, Any], cap: int) -> int:
    """The most items generation lets array schema `s` have, the cap giving way to what its
    own minItems and prefixItems need (applied where the schema allows more)."""
    return max(cap, s.get("minItems", 0), len(s.get("prefixItems", [])))


def _any_value(defaults: Defaults) -> dict[str, Any]:
    """Any JSON value, its own strings, arrays and objects within the generation bounds (what
    an array's items or an object's other properties may be where the schema says nothing)."""
    bounds = {"maxLength": defaults.max_string_length, "maxItems": defaults.max_array_items,
              "maxProperties": defaults.max_array_items}  # fmt: skip
    return {"type": list(_TYPES), **{k: v for k, v in bounds.items() if v}}


def _place_contains(backend: str, defaults: Defaults) -> Step:
    """A `transform` step that writes an array's `contains` as the backend can enforce it,
    where its allOf is enforced and the generation defaults bound arrays: one of the first
    positions (up to the bound, at most MAX_CONTAINS_POSITIONS) holds an item that matches
    (`{"allOf": [{"anyOf": [{"prefixItems": [{}] * k + [contains], "minItems": k + 1}, ...]}]}`).
    A minContains above 1, a maxContains or a draft-4 list of items leave it as it is."""
    cap = defaults.max_array_items if "allOf" in ENFORCED[backend] else 0

    def step(s: dict[str, Any], _: str) -> dict[str, Any]:
        simple_count = s.get("minContains", 1) in (0, 1) and "maxContains" not in s
        if not cap or "contains" not in s or not simple_count or isinstance(s.get("items"), list):
            return s
        contains, minimum = s["contains"], s.get("minContains", 1)
        s = {k: v for k, v in s.items() if k not in ("contains", "minContains")}
        if minimum == 0:  # satisfied by any array
            return s
        bound = _array_bound(s, cap)
        positions = int(min(s.get("maxItems", bound), bound, MAX_CONTAINS_POSITIONS))
        if positions < 1:  # no array can satisfy it: left for the check after generation
            return {**s, "contains": contains}
        at = [{"prefixItems": [{}] * k + [contains], "minItems": k + 1} for k in range(positions)]
        return {**s, "allOf": [*s.get("allOf", []), {"anyOf": at}]}

    return step


# -- oneOf: the types two branches both accept whole, which no valid value can have ---------
_TYPES = ("null", "boolean", "object", "array", "string", "number")
_APPLIES_TO = {
    "object": {"properties", "required", "additionalProperties", "patternProperties",
               "minProperties", "maxProperties", "propertyNames", "dependencies",
               "dependentRequired", "dependentSchemas", "unevaluatedProperties"},
    "array": {"items", "prefixItems", "additionalItems", "minItems", "maxItems", "uniqueItems",
              "contains", "minContains", "maxContains", "unevaluatedItems"},
    "string": {"minLength", "maxLength", "pattern", "format"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
}  # fmt: skip
_TYPED = set().union(*_APPLIES_TO.values())


def _one_of_types(root: Any) -> Step:
    """A `transform` step giving each schema with a oneOf the types its values can have,
    where branches of the schema as written (before any keyword is dropped) rule some out."""

    def step(s: dict[str, Any], _: str) -> dict[str, Any]:
        excluded = _types_one_of_excludes(s, root)
        if not excluded:
            return s
        given = s.get("type") if isinstance(s.get("type"), list) else [s.get("type")]
        allowed = [t for t in given if t] or list(_TYPES)
        kept = [t for t in allowed if t not in excluded]
        return {**s, "type": kept} if kept else s  # no type left: the schema admits nothing

    return step


def _types_one_of_excludes(s: dict[str, Any], root: Any) -> set[str]:
    """The types no value valid under `s`'s oneOf can have: those that two or more branches
    accept whole (a string under two object schemas without a `type` is valid under both, so
    it fails the oneOf). Read as anyOf, the grammar would let such values through."""
    branches = s.get("oneOf")
    if not isinstance(branches, list):
        return set()
    counts: dict[str, int] = {}
    for branch in branches:
        for t in _accepted_whole(branch, root, depth=8):
            counts[t] = counts.get(t, 0) + 1
    excluded = {t for t, n in counts.items() if n >= 2}
    return excluded | {"integer"} if "number" in excluded else excluded


def _accepted_whole(s: Any, root: Any, depth: int) -> set[str]:
    """Types every value of which `s` accepts (a subset where unsure): those none of its
    keywords constrains; for a $ref, its target's; for an allOf, its parts' in common; for an
    anyOf, any part's."""
    if s is True or s == {}:
        return set(_TYPES)
    if not isinstance(s, dict) or depth == 0:
        return set()
    keys = s.keys() & VALIDATION
    if keys & {"type", "enum", "const", "not", "if", "oneOf", "$dynamicRef", "$recursiveRef"} \
            or keys - _TYPED - {"$ref", "allOf", "anyOf"}:  # fmt: skip
        return set()
    whole = {t for t in _TYPES if not keys & _APPLIES_TO.get(t, set())}
    if "$ref" in s:
        whole &= _accepted_whole(_resolve(s["$ref"], root), root, depth - 1)
    if "allOf" in s:
        for part in s["allOf"] if isinstance(s["allOf"], list) else [False]:
            whole &= _accepted_whole(part, root, depth - 1)
    if "anyOf" in s:
        parts = s["anyOf"] if isinstance(s["anyOf"], list) else []
        whole &= set().union(*(_accepted_whole(p, root, depth - 1) for p in parts))
    return whole


def _resolve(ref: Any, root: Any) -> Any:
    """The subschema a local $ref ("#/definitions/x") points at; None where it cannot tell."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node = root
    for part in filter(None, ref[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _longer_string(s: dict[str, Any], cap: int) -> bool:
    """Whether a string schema allows strings longer than `cap`: no enum or const, no
    maxLength up to `cap`, and a pattern (if any) with an open repetition that asks for no
    more than a few."""
    if {"enum", "const"} & s.keys() or s.get("maxLength", cap + 1) <= cap:
        return False
    pattern = s.get("pattern")
    if not isinstance(pattern, str):
        return True
    least = [int(n) for n in re.findall(r"\{(\d+),\}", pattern)]
    return bool(re.search(r"[+*]|\{\d+,\}", pattern)) and max(least, default=0) <= 16


def _describe_required(s: dict[str, Any], _: str = "") -> dict[str, Any]:
    """`s` with each required property it does not list under `properties` listed there, with
    the schema that governs it (the first patternProperties pattern it matches, else
    additionalProperties): a backend that drops patternProperties, or bounds an object to the
    properties it names, still writes it."""
    required = s.get("required")
    listed = s.get("properties", {})
    if not isinstance(required, list) or not isinstance(listed, dict):
        return s
    missing = [n for n in required if isinstance(n, str) and n not in listed]
    if not missing:
        return s
    patterns = s.get("patternProperties") if isinstance(s.get("patternProperties"), dict) else {}
    rest = s.get("additionalProperties")
    properties = dict(listed)
    for name in missing:
        governing = [sub for pattern, sub in patterns.items() if _search(pattern, name)]
        properties[name] = governing[0] if governing else rest if isinstance(rest, dict) else {}
    return {**s, "properties": properties}


def _search(pattern: str, name: str) -> bool:
    try:
        return re.search(pattern, name) is not None
    except re.error:  # an ECMA-262 pattern Python cannot read: no match claimed
        return False


def violations(output: str, schema: Any) -> list[str]:
    """What makes `output` fail `schema`, each naming the keyword and where (JSONPath); the
    empty list for a valid document."""
    import jsonschema

    try:
        document = json.loads(output)
    except ValueError as e:
        return [f"not JSON ({e})"]
    cls = jsonschema.validators.validator_for(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(document), key=lambda e: e.json_path)
    return [f"{e.validator} at {e.json_path}: {e.message}" for e in errors]


class NumberDigits:
    """A token filter that ends each run of digits at `limit`: a JSON number's integral,
    fractional and exponent parts, and runs of digits inside strings (where a small model
    otherwise counts on: "1234567891123456781123..."). It follows the text generated and
    refuses a token whose leading digits would run past the limit."""

    def __init__(self, vocab: Any, limit: int):
        self.limit = limit
        self._leading, self._tokens = vocab.leading_digits, vocab.tokens  # a grammar.Vocabulary
        self._in_string = self._escaped = False
        self._digits: int | None = None  # digits of the run being written, if in one

    def allowed(self) -> np.ndarray | None:
        """Which tokens may come next (None: any)."""
        if self._digits is None:
            return None
        return self._leading <= self.limit - self._digits

    def accept(self, token: int) -> None:
        for byte in self._tokens[token] if 0 <= token < len(self._tokens) else b"":
            self._step(chr(byte))

    def _step(self, c: str) -> None:
        if self._in_string:
            if self._escaped:
                self._escaped, self._digits = False, 0
            elif c == '"':
                self._in_string, self._digits = False, None
            else:
                self._escaped = c == "\\"
                self._digits = self._digits + 1 if c.isdigit() else 0
        elif c == '"':
            self._in_string, self._digits = True, 0
        elif c.isdigit():
            self._digits = (self._digits or 0) + 1
        elif c in "-+" and (self._digits is None or self._digits == 0):
            self._digits = 0  # a sign starts a number or its exponent
        elif c in ".eE" and self._digits is not None:
            self._digits = 0  # the next part of the same number
        else:
            self._digits = None
