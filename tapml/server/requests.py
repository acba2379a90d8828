"""Reading OpenAI requests: every field checked and named before anything touches the model.

`chat_request`, `completion_request` and `embedding_request` turn a parsed JSON body into what
the worker runs (a Generation, an Embedding), or raise ApiError 400 naming the field. Fields
OpenAI accepts but tapml cannot honour (tools, n > 1, logit_bias) are refused by name;
fields OpenAI does not know are refused as OpenAI refuses them. A few sampling extensions
that llama.cpp's and vLLM's servers take as well (top_k, min_p, repetition_penalty) are
accepted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from tapml.errors import TapmlError
from tapml.runtime.sampling import SamplingParams

from .errors import ApiError, bad_field

MAX_STOPS = 4  # as OpenAI
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI; completions' logprobs: 5
MAX_EMBEDDING_INPUTS = 2048
# fields whose meaning tapml has nothing to do with: taken and ignored, as OpenAI's servers
# ignore them for models they do not concern
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls",
            "prompt_cache_key", "safety_identifier"}  # fmt: skip
_EXTENSIONS = {"top_k", "min_p", "repetition_penalty"}
_SAMPLING = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "presence_penalty",
             "frequency_penalty", "logprobs", "stream", "stream_options", "n", "logit_bias",
             } | _EXTENSIONS | _IGNORED  # fmt: skip
CHAT_FIELDS = _SAMPLING | {"messages", "max_completion_tokens", "top_logprobs",
                           "response_format", "tools", "tool_choice", "functions",
                           "function_call"}  # fmt: skip
COMPLETION_FIELDS = _SAMPLING | {"prompt", "echo", "best_of", "suffix"}
EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions"} | _IGNORED
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Generation:
    """A generation request, checked and tokenized, ready for the worker."""

    kind: str  # "chat" or "completion"
    prompt_ids: list[int]
    params: SamplingParams
    constraint: Any = None  # a runtime.grammar constraint, post-checked after generation
    logprobs: int | None = None  # None: none; else how many alternatives per token
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    echo: str = ""  # completions' echo: the prompt text, put before the completion


@dataclass
class Embedding:
    """An embedding request: token ids per input."""

    rows: list[list[int]]
    base64: bool = False
    truncated: list[int] = field(default_factory=list)


class Body:
    """A request body's fields, read one by one with their checks."""

    def __init__(self, data: Any, fields: set[str]):
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_body")
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ApiError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}",
                           param=unknown[0], code="unknown_parameter")  # fmt: skip
        # null means "not given", as in OpenAI's API
        self.data = {k: v for k, v in data.items() if v is not None}

    def has(self, name: str) -> bool:
        return name in self.data

    def number(self, name: str, default: float, low: float, high: float | None = None) -> float:
        value = self.data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):  # fmt: skip
            raise bad_field(name, f"expected a number, got {json.dumps(value)}", "invalid_type")
        if value < low or (high is not None and value > high):
            raise bad_field(name, f"{value} is out of range ({low} to {high or 'any'})")
        return float(value)

    def integer(self, name: str, default: int | None, low: int,
                high: int | None = None) -> int | None:  # fmt: skip
        value = self.data.get(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_field(name, f"expected an integer, got {json.dumps(value)}", "invalid_type")
        if value < low or (high is not None and value > high):
            bound = f"{low} to {high}" if high is not None else f"at least {low}"
            raise bad_field(name, f"{value} is out of range ({bound})")
        return value

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.data.get(name, default)
        if not isinstance(value, bool):
            raise bad_field(name, f"expected true or false, got {json.dumps(value)}",
                            "invalid_type")  # fmt: skip
        return value

    def get(self, name: str, default: Any = None) -> Any:
        return self.data.get(name, default)


def model_of(data: Any) -> Any:
    """The `model` field, whatever the rest holds (to answer 404 before 400)."""
    return data.get("model") if isinstance(data, dict) else None


def chat_request(data: Any, engine: Any, constraint_for) -> Generation:
    """A /v1/chat/completions body, checked: its messages through the chat template."""
    body = Body(data, CHAT_FIELDS)
    _refuse_tools(body)
    messages = _messages(body.get("messages"))
    try:
        prompt = engine.tokenizer.apply_chat_template(messages)
    except (TapmlError, ValueError, TypeError) as e:
        raise bad_field("messages", f"the model's chat template refuses them: {e}") from e
    ids = engine.tokenizer.encode(prompt)
    limit = "max_completion_tokens" if body.has("max_completion_tokens") else "max_tokens"
    max_tokens = body.integer(limit, None, 1)
    logprobs = None
    if body.flag("logprobs"):
        logprobs = body.integer("top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    elif body.has("top_logprobs"):
        raise bad_field("top_logprobs", "needs logprobs: true")
    return Generation(
        "chat", ids, _sampling(body, engine, ids, max_tokens, limit),
        constraint=_response_format(body.get("response_format"), engine, constraint_for),
        logprobs=logprobs, stream=body.flag("stream"), include_usage=_include_usage(body),
    )  # fmt: skip


def completion_request(data: Any, engine: Any) -> Generation:
    """A /v1/completions body, checked: its prompt text (or token ids) tokenized."""
    body = Body(data, COMPLETION_FIELDS)
    _refuse_tools(body)
    if body.integer("best_of", 1, 1) != 1:
        raise bad_field("best_of", "only 1 is supported", "unsupported_value")
    if body.get("suffix"):
        raise bad_field("suffix", "insertion (a suffix) is not supported", "unsupported_value")
    prompt, ids = _prompt(body.get("prompt"), engine)
    logprobs = body.integer("logprobs", None, 0, 5)
    echo = body.flag("echo")
    if echo and logprobs is not None:
        raise bad_field("echo", "echo with logprobs (the prompt's logprobs) is not supported",
                        "unsupported_value")  # fmt: skip
    return Generation(
        "completion", ids, _sampling(body, engine, ids, body.integer("max_tokens", 16, 1),
                                     "max_tokens"),
        logprobs=logprobs, stream=body.flag("stream"), include_usage=_include_usage(body),
        echo=prompt if echo else "",
    )  # fmt: skip


def embedding_request(data: Any, embedder: Any) -> Embedding:
    """A /v1/embeddings body, checked: each input's token ids (cut to the longest bucket)."""
    body = Body(data, EMBEDDING_FIELDS)
    inputs = body.get("input")
    if isinstance(inputs, str) or _is_ids(inputs):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise bad_field("input", "expected a string, a list of strings, or token ids")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise bad_field("input", f"{len(inputs)} inputs; at most {MAX_EMBEDDING_INPUTS}")
    texts = [i for i in inputs if isinstance(i, str)]
    if texts and len(texts) != len(inputs) or not texts and not all(map(_is_ids, inputs)):
        raise bad_field("input", "expected strings or token id lists, not a mix")
    vocab = embedder.tokenizer.vocab_size
    if texts:
        if not all(texts):
            raise bad_field("input", "an input is empty")
        rows = embedder.tokenize(texts)
    else:
        rows = [_check_ids(r, vocab, "input") for r in inputs]
    limit = embedder.task.max_length
    truncated = [i for i, r in enumerate(rows) if len(r) > limit]
    rows = [r[:limit] for r in rows]
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise bad_field("encoding_format", f"{json.dumps(fmt)}: expected 'float' or 'base64'")
    dims = body.integer("dimensions", None, 1)
    if dims is not None and dims != embedder.dim:
        raise bad_field("dimensions", f"this model embeds in {embedder.dim} dimensions only",
                        "unsupported_value")  # fmt: skip
    return Embedding(rows, fmt == "base64", truncated)


def _sampling(body: Body, engine: Any, ids: list[int], max_tokens: int | None,
              limit: str) -> SamplingParams:  # fmt: skip
    """The sampling fields, OpenAI's defaults for those not given (temperature 1, top_p 1),
    and a max_tokens that fits the context (by default: what is left of it)."""
    if body.integer("n", 1, 1) != 1:
        raise bad_field("n", "only one choice per request is supported", "unsupported_value")
    if body.get("logit_bias"):
        raise bad_field("logit_bias", "not supported", "unsupported_value")
    room = engine.max_context - len(ids)
    if room <= 0:
        raise ApiError(400, f"This model's maximum context length is {engine.max_context} "
                       f"tokens; the prompt has {len(ids)}. Shorten it.", param="messages"
                       if body.has("messages") else "prompt",
                       code="context_length_exceeded")  # fmt: skip
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {engine.max_context} "
                       f"tokens. However, you requested {len(ids) + max_tokens} tokens "
                       f"({len(ids)} in the prompt, {max_tokens} for the completion). Ask for "
                       f"at most {room}.", param=limit,
                       code="context_length_exceeded")  # fmt: skip
    return SamplingParams(
        temperature=body.number("temperature", 1.0, 0, 2),
        top_p=body.number("top_p", 1.0, 0, 1) or 1e-9,  # 0: the most likely token alone
        top_k=body.integer("top_k", 0, 0),
        min_p=body.number("min_p", 0.0, 0, 1),
        repetition_penalty=_positive(body, "repetition_penalty"),
        presence_penalty=body.number("presence_penalty", 0.0, -2, 2),
        frequency_penalty=body.number("frequency_penalty", 0.0, -2, 2),
        seed=_seed(body),
        max_tokens=max_tokens or room,
        stop=_stops(body.get("stop", [])),
    )


def _positive(body: Body, name: str) -> float:
    value = body.number(name, 1.0, 0)
    if value == 0:
        raise bad_field(name, "must be above 0 (1 is off)")
    return value


def _seed(body: Body) -> int | None:
    seed = body.integer("seed", None, -(2**63), 2**64 - 1)
    return None if seed is None else seed % 2**64  # OpenAI takes negative seeds


def _stops(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_field("stop", "expected a non-empty string or a list of them")
    if len(stops) > MAX_STOPS:
        raise bad_field("stop", f"{len(stops)} stop strings; at most {MAX_STOPS}")
    return tuple(stops)


def _include_usage(body: Body) -> bool:
    options = body.get("stream_options", {})
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise bad_field("stream_options", "expected {\"include_usage\": true|false}")
    if options and not body.flag("stream"):
        raise bad_field("stream_options", "only allowed with stream: true")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise bad_field("stream_options.include_usage", "expected true or false", "invalid_type")
    return usage


def _refuse_tools(body: Body) -> None:
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad_field(name, "tool calling is not supported", "unsupported_value")
    for name in ("tool_choice", "function_call"):
        if body.get(name, "none") != "none":
            raise bad_field(name, "tool calling is not supported", "unsupported_value")


def _messages(messages: Any) -> list[dict[str, str]]:
    """The conversation as the chat template takes it: roles and text contents."""
    if not isinstance(messages, list) or not messages:
        raise bad_field("messages", "expected a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_field(where, "expected an object with role and content", "invalid_type")
        unknown = sorted(set(message) - {"role", "content", "name", "refusal"})
        if unknown:
            raise bad_field(f"{where}.{unknown[0]}", "not supported (tapml serves text chat)",
                            "unsupported_value")  # fmt: skip
        role = message.get("role")
        if role not in _ROLES:
            raise bad_field(f"{where}.role", f"{json.dumps(role)}: expected one of "
                            f"{', '.join(_ROLES)}")  # fmt: skip
        out.append({"role": _ROLES[role], "content": _text(message.get("content"),
                                                           f"{where}.content")})  # fmt: skip
    return out


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):  # fmt: skip
                raise bad_field(f"{where}[{j}]", "expected a text part {\"type\": \"text\", "
                                "\"text\": ...} (tapml serves text chat)")  # fmt: skip
            parts.append(part["text"])
        return "".join(parts)
    raise bad_field(where, "expected a string or a list of text parts", "invalid_type")


def _prompt(prompt: Any, engine: Any) -> tuple[str, list[int]]:
    """A completion prompt, as text and ids: a string, token ids, or a list of one of those."""
    if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str)
                                                          or _is_ids(prompt[0])):  # fmt: skip
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_field("prompt", "is empty")
        return prompt, engine.tokenizer.encode(prompt)
    if _is_ids(prompt):
        ids = _check_ids(prompt, engine.tokenizer.vocab_size, "prompt")
        return engine.tokenizer.decode(ids), ids
    raise bad_field("prompt", "expected a string or a list of token ids (one prompt per "
                    "request)")  # fmt: skip


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in value)  # fmt: skip


def _check_ids(ids: list[int], vocab: int, where: str) -> list[int]:
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise bad_field(where, f"token id {bad[0]} is outside the vocabulary (0 to {vocab - 1})")
    return ids


def _response_format(value: Any, engine: Any, constraint_for) -> Any:
    """The constraint `response_format` asks for: None for text, any JSON object for
    json_object, the schema's for json_schema (strict: refuse keywords the grammar cannot
    enforce)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text" and set(value) == {"type"}:
        return None
    if kind == "json_object" and set(value) == {"type"}:
        return constraint_for("any_json", None, strict=False)
    if kind != "json_schema" or set(value) != {"type", "json_schema"}:
        raise bad_field("response_format", "expected {\"type\": \"text\"}, {\"type\": "
                        "\"json_object\"} or {\"type\": \"json_schema\", \"json_schema\": "
                        "{...}}")  # fmt: skip
    spec = value["json_schema"]
    where = "response_format.json_schema"
    if not isinstance(spec, dict) or "name" not in spec or \
            set(spec) - {"name", "description", "schema", "strict"}:  # fmt: skip
        raise bad_field(where, "expected {\"name\", \"schema\", \"strict\"} (and a description)")
    if not isinstance(spec["name"], str) or not spec["name"]:
        raise bad_field(f"{where}.name", "expected a non-empty string")
    schema = spec.get("schema", {})
    strict = spec.get("strict") or False
    if not isinstance(schema, (dict, bool)) or not isinstance(strict, bool):
        raise bad_field(where, "schema is a JSON schema object, strict true or false")
    try:
        return constraint_for("json_schema", json.dumps(schema), strict=strict)
    except TapmlError as e:
        raise bad_field(f"{where}.schema", str(e)) from e
