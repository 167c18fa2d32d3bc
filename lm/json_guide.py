"""Guided decoding: only tokens that keep the output a prefix of JSON matching a schema (or of one of
a list of strings, vLLM's guided choice, or of text a regex or a GBNF grammar matches, vLLM's guided
regex and grammar) are sampled.

What OpenAI's `response_format` (json_object, json_schema) and a forced tool call (`tool_choice`
"required" or a named function) need, as vLLM does with xgrammar, here in plain Python. A schema
compiles into a `JsonGrammar`; a `JsonGuide` follows one sequence's output byte by byte with a
small nondeterministic pushdown machine (a set of stacks of frames, each an immutable tuple), so
trying a token is copying nothing. Bytes, not characters: byte-level BPE tokens may end inside a
UTF-8 character, and everything JSON says about structure is ASCII.

Sampling tries the model's own choice first and masks the whole vocabulary only when the grammar
refuses it (`Engine` does this); with plain temperature sampling a refused draw followed by a masked
one samples exactly from the distribution renormalized over the allowed tokens, and a trained model's
first choice usually fits.
The supported schema keywords are `SUPPORTED`; any other keyword that constrains a value is refused
up front, so the output never silently breaks the schema. A string's `pattern` and the `format`s in
lm.regex_guide.FORMATS run as regexes (lm.regex_guide) over its characters.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from fractions import Fraction
from typing import Any, Optional

import torch

from lm.ebnf_guide import Grammar
from lm.regex_guide import FORMATS, Regex, RegexError

# Keywords that constrain a value, all enforced; annotations (ANNOTATIONS) are read past.
SUPPORTED = ("type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
             "enum", "const", "anyOf", "oneOf", "$ref", "$defs", "definitions", "minLength", "maxLength",
             "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",  # bounded numbers: no exponent
             "pattern")  # and `format`, where lm.regex_guide.FORMATS has it (else an annotation)
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
ANNOTATIONS = ("title", "description", "default", "examples", "$schema", "$id", "$comment", "format",
               "strict", "deprecated", "readOnly", "writeOnly")
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
# Between tokens at most one space, as Outlines allows by default: left free, models (a weak one
# especially) loop on blank space and newlines. The output is compact JSON, the same value.
MAX_WHITESPACE = 1
MAX_NUMBER_BYTES = 24
# Each grammar keeps the masks of its recent states, one byte a token each: 16 MiB is ~2,000 masks of
# an 8,192-token vocabulary, ~110 of a 152,000-token one (Qwen's).
MASK_CACHE_BYTES = 16 << 20
_WS = frozenset(b" ")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")


Bound = tuple[Fraction, bool]  # (value, inclusive)


class SchemaError(ValueError):
    """A schema this guide cannot enforce; `path` names where in the schema (e.g. 'properties.age')."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class Spec:
    """One compiled schema node. Compared by identity: frames hold it, and states are hashed."""

    __slots__ = ("types", "literals", "props", "next_keys", "closable", "extra", "items", "min_items", "max_items",
                 "min_len", "max_len", "alternatives", "low", "high", "pattern", "text", "rules")

    def __init__(self):
        self.types: frozenset[str] = frozenset(TYPES)
        self.literals: Optional[list[bytes]] = None  # enum/const: the value's JSON text, exactly
        self.props: Optional[dict[bytes, Spec]] = None  # declared properties (JSON-escaped names); None: any keys
        # Properties are written in the schema's order, as OpenAI's structured outputs (and xgrammar)
        # write them, optional ones skippable: with the first i declared names behind, next_keys[i]
        # maps each name that may come next to the position after it; closable[i]: none required left.
        self.next_keys: tuple[dict[bytes, int], ...] = ({},)
        self.closable: tuple[bool, ...] = (True,)
        self.extra: Optional[Spec] = None  # the value of any key, where props is None
        self.items: Optional[Spec] = None
        self.min_items, self.max_items = 0, None
        self.min_len, self.max_len = 0, None
        self.alternatives: Optional[list[Spec]] = None  # anyOf/oneOf: any one of these
        self.low: Optional[Bound] = None  # a number's bounds (value, inclusive)
        self.high: Optional[Bound] = None
        self.pattern: Optional[Regex] = None  # a string's characters (after JSON's escapes) match it whole
        self.text: Optional[Regex] = None  # not JSON: raw text this regex matches whole (vLLM's guided regex)
        self.rules: Optional[Grammar] = None  # not JSON: raw text this grammar matches (vLLM's guided grammar)


def _any() -> Spec:
    spec = Spec()
    spec.extra = spec.items = spec  # any JSON: values inside are any JSON too
    return spec


def _json_text(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


class _Compiler:
    def __init__(self, root: dict):
        self.root = root
        self.refs: dict[str, Spec] = {}

    def compile(self, schema: Any, path: str) -> Spec:
        if schema is True or schema == {}:
            return _any()
        if not isinstance(schema, dict):
            raise SchemaError(path, "must be a JSON Schema object")
        unknown = sorted(k for k in schema if k not in SUPPORTED and k not in ANNOTATIONS)
        if unknown:
            raise SchemaError(_join(path, unknown[0]), f"is not supported in guided decoding; supported: {', '.join(SUPPORTED)}")
        if "$ref" in schema:
            return self.ref(schema["$ref"], _join(path, "$ref"))
        spec = Spec()
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = schema[key]
                if not isinstance(options, list) or not options:
                    raise SchemaError(_join(path, key), "must be a non-empty list of schemas")
                spec.alternatives = [self.compile(o, f"{_join(path, key)}[{i}]") for i, o in enumerate(options)]
                return spec
        if "const" in schema:
            spec.literals = [_json_text(schema["const"])]
            return spec
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise SchemaError(_join(path, "enum"), "must be a non-empty list")
            spec.literals = [_json_text(v) for v in schema["enum"]]
            return spec
        kinds = schema.get("type", list(TYPES))
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not isinstance(kinds, list) or not kinds or any(k not in TYPES for k in kinds):
            raise SchemaError(_join(path, "type"), f"must be one of {', '.join(TYPES)} (or a list of them)")
        spec.types = frozenset(kinds)
        if "properties" in schema:
            properties = schema["properties"]
            if not isinstance(properties, dict):
                raise SchemaError(_join(path, "properties"), "must be an object of schemas")
            spec.props = {_json_text(name)[1:-1]: self.compile(sub, _join(path, f"properties.{name}"))
                          for name, sub in properties.items()}
        required = schema.get("required", [])
        if not isinstance(required, list) or any(r not in (schema.get("properties") or {}) for r in required):
            raise SchemaError(_join(path, "required"), "must list names from 'properties'")
        if spec.props is not None:
            spec.next_keys, spec.closable = _property_order(list(spec.props), {_json_text(r)[1:-1] for r in required})
        extra = schema.get("additionalProperties", True)
        if spec.props is None:
            spec.extra = _any() if extra is True else (None if extra is False else
                                                         self.compile(extra, _join(path, "additionalProperties")))
            if spec.extra is None:
                spec.props = {}
        spec.items = self.compile(schema.get("items", True), _join(path, "items"))
        spec.min_items, spec.max_items = _bounds(schema, "minItems", "maxItems", path)
        spec.min_len, spec.max_len = _bounds(schema, "minLength", "maxLength", path)
        spec.low, spec.high = _number_bounds(schema, spec.types, path)
        spec.pattern = _string_pattern(schema, path)
        if spec.pattern is not None and "string" in spec.types and (spec.min_len or spec.max_len is not None) \
                and not _length_can_fit(spec, spec.pattern.start, 0):
            key = "pattern" if "pattern" in schema else "format"
            length = (f"at least {spec.min_len}" if spec.max_len is None else
                      f"{spec.min_len} to {spec.max_len}" if spec.min_len else f"at most {spec.max_len}")
            raise SchemaError(_join(path, key), f"no string of {length} characters (minLength, maxLength) matches it")
        return spec

    def ref(self, ref: Any, path: str) -> Spec:
        """A local reference (#/$defs/Name, #/definitions/Name), compiled once so recursion terminates."""
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise SchemaError(path, "only local references ('#/$defs/...') are supported")
        if ref not in self.refs:
            target: Any = self.root
            for part in ref[2:].split("/"):
                if not isinstance(target, dict) or part not in target:
                    raise SchemaError(path, f"{ref!r} does not resolve in this schema")
                target = target[part]
            placeholder = Spec()
            placeholder.alternatives = []
            self.refs[ref] = placeholder
            placeholder.alternatives.append(self.compile(target, ref[2:].replace("/", ".")))
        return self.refs[ref]


def _property_order(names: list[bytes], required: set[bytes]) -> tuple[tuple, tuple]:
    next_keys, closable = [], []
    for i in range(len(names) + 1):
        eligible = {}
        for j in range(i, len(names)):
            eligible[names[j]] = j + 1
            if names[j] in required:  # nothing after a required property before it is written
                break
        next_keys.append(eligible)
        closable.append(not required & set(names[i:]))
    return tuple(next_keys), tuple(closable)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _number_bounds(schema: dict, kinds: frozenset, path: str) -> tuple[Optional[Bound], Optional[Bound]]:
    """minimum/maximum and their exclusive forms as exact (value, inclusive) bounds; an integer's are
    whole numbers, inclusive. A bounded number is written without an exponent, so that its bytes say
    its size as they come."""
    given = [key for key in BOUNDS if key in schema]
    if not given:
        return None, None
    for key in given:
        if isinstance(schema[key], bool) or not isinstance(schema[key], (int, float)) or not math.isfinite(schema[key]):
            raise SchemaError(_join(path, key), "must be a finite number")
    if not kinds & {"integer", "number"}:
        raise SchemaError(_join(path, given[0]), "bounds a number: the type must include number or integer")
    exact = {key: Fraction(repr(schema[key])) for key in given}  # 0.1 as the decimal written, not the float
    lows = [(exact[key], key == "minimum") for key in ("minimum", "exclusiveMinimum") if key in exact]
    highs = [(exact[key], key == "maximum") for key in ("maximum", "exclusiveMaximum") if key in exact]
    if "number" not in kinds:  # integers: whole, inclusive bounds
        lows = [(math.ceil(v) if inclusive else math.floor(v) + 1, True) for v, inclusive in lows]
        highs = [(math.floor(v) if inclusive else math.ceil(v) - 1, True) for v, inclusive in highs]
    low = max(lows, key=lambda b: (b[0], not b[1]), default=None)  # the tighter; exclusive if equal
    high = min(highs, key=lambda b: (b[0], b[1]), default=None)
    if low and high and (high[0] < low[0] or (high[0] == low[0] and not (low[1] and high[1]))):
        raise SchemaError(_join(path, given[-1]), f"leaves no {'number' if 'number' in kinds else 'integer'} "
                                                  "between the bounds")
    return low, high


def _string_pattern(schema: dict, path: str) -> Optional[Regex]:
    """`pattern`, else a `format` FORMATS enforces, as a regex over the string's characters. Matched
    whole, as Outlines and xgrammar do: what it writes also matches the pattern as a search."""
    key = "pattern" if "pattern" in schema else "format" if schema.get("format") in FORMATS else None
    if key is None:
        return None
    try:
        return Regex(schema[key] if key == "pattern" else FORMATS[schema[key]])
    except RegexError as error:
        raise SchemaError(_join(path, key), str(error)) from None


def _bounds(schema: dict, low_key: str, high_key: str, path: str) -> tuple[int, Optional[int]]:
    low, high = schema.get(low_key, 0), schema.get(high_key)
    for key, value in ((low_key, low), (high_key, high)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise SchemaError(_join(path, key), "must be a non-negative integer")
    if high is not None and high < low:
        raise SchemaError(_join(path, high_key), f"must be >= {low_key}")
    return low, high


class JsonGrammar:
    """A compiled schema (None: any JSON object, OpenAI's json_object mode), shared by every request
    that uses it; masks of the whole vocabulary are cached per parser state."""

    def __init__(self, schema: Optional[dict] = None, *, root: Optional[Spec] = None, key: Optional[str] = None):
        self.key = key or json.dumps(schema, sort_keys=True)  # the same schema, the same grammar (and mask cache)
        if root is None and schema is None:
            root = Spec()
            root.types = frozenset({"object"})
            root.extra = root.items = _any()
        elif root is None:
            if not isinstance(schema, dict):
                raise SchemaError("", "the schema must be a JSON object")
            root = _Compiler(schema).compile(schema, "")
        self.root = root
        self._masks: OrderedDict[frozenset, torch.Tensor] = OrderedDict()

    @classmethod
    def choice(cls, options: list[str]) -> "JsonGrammar":
        """Output exactly one of these strings, as written (vLLM's guided choice: no JSON quoting)."""
        root = Spec()
        root.literals = [option.encode() for option in options]
        return cls(root=root, key="choice:" + json.dumps(options))

    @classmethod
    def regex(cls, pattern: str) -> "JsonGrammar":
        """Output text the regex matches whole (vLLM's guided regex: raw text, not JSON)."""
        root = Spec()
        root.text = _compiled(Regex, pattern)
        return cls(root=root, key="regex:" + pattern)

    @classmethod
    def ebnf(cls, text: str) -> "JsonGrammar":
        """Output text a GBNF grammar matches (vLLM's guided grammar; lm.ebnf_guide): as one regex where
        its rules do not recurse, else by the grammar's stack machine."""
        root = Spec()
        grammar = _compiled(Grammar, text)
        root.text = grammar.as_regex()
        if root.text is None:
            root.rules = grammar
        return cls(root=root, key="grammar:" + text)

    def guide(self) -> "JsonGuide":
        return JsonGuide(self)


def _compiled(build, source: str):
    """A regex or grammar for raw text, its errors as SchemaErrors."""
    try:
        return build(source)
    except RegexError as error:
        raise SchemaError("", str(error)) from None


class JsonGuide:
    """One sequence's position in the grammar: the set of parser stacks its output so far allows."""

    def __init__(self, grammar: JsonGrammar):
        self.grammar = grammar
        # No whitespace before the value: a reply is the document (or the choice) from its first byte.
        # Raw text starts in its regex's or grammar's own frame, which may end before any byte.
        root = grammar.root
        first = (("rx", root.text, root.text.start) if root.text is not None else
                 ("gb", root.rules, root.rules.start) if root.rules is not None else ("val", root, MAX_WHITESPACE))
        self.states: frozenset = frozenset({(first, None)})
        self._tried: tuple[Optional[bytes], frozenset] = (None, frozenset())  # the last token allows() walked

    def after(self, data: bytes, states: Optional[frozenset] = None) -> frozenset:
        """The states after `data` (from `states`, by default the guide's own); empty if refused."""
        return _walk_all(data, self.states if states is None else states)

    def allows(self, data: Optional[bytes]) -> bool:
        if not data:
            return False
        self._tried = (data, self.after(data))  # the engine advances by the token it just tried
        return bool(self._tried[1])

    def advance(self, data: bytes) -> None:
        self.states = self._tried[1] if self._tried[0] == data else self.after(data)
        self._tried = (None, frozenset())

    @property
    def can_end(self) -> bool:
        """The output so far is a whole document (end-of-text may come now)."""
        return any(_can_end(s) for s in self.states)

    @property
    def done(self) -> bool:
        """A whole document that nothing may extend: the sequence ends here."""
        return self.states == frozenset({None})

    def mask(self, token_bytes: list[Optional[bytes]]) -> torch.Tensor:
        """Which tokens the grammar allows next (bool, one per token), cached per state."""
        cache = self.grammar._masks
        if self.states in cache:
            cache.move_to_end(self.states)
            return cache[self.states]
        # Inside a plain string, tokens of printable ASCII without quote or backslash leave the state as
        # it is: allowed without walking them (most of a vocabulary, and the common place to mask).
        # Other tokens are walked from the states after their first byte, computed once per byte, and
        # only where that byte is allowed; inside a pattern or a regex, by its DFA alone where it can.
        plain, by_first = _token_index(token_bytes)
        rooms = [_plain_string_room(s) for s in self.states]
        room = -1 if None in rooms else min(rooms)  # characters any state's string may still take
        allowed = []
        for byte, tokens in by_first.items():
            states = self.after(bytes([byte]))
            if states:
                walk = _regex_walk(states) or (lambda data, states=states: bool(self.after(data, states)))
                allowed += [i for i, rest in tokens if (plain[i] and len(rest) < room) or not rest or walk(rest)]
        mask = torch.zeros(len(token_bytes), dtype=torch.bool)
        mask[allowed] = True
        cache[self.states] = mask
        while len(cache) > 1 and len(cache) * len(token_bytes) > MASK_CACHE_BYTES:  # oldest first
            cache.popitem(last=False)
        return mask


_PLAIN_BYTES = frozenset(range(0x20, 0x7F)) - {0x22, 0x5C}
_index_cache: dict[int, tuple] = {}


def _token_index(token_bytes: list[Optional[bytes]]) -> tuple[list[bool], dict[int, list]]:
    """Per token table: which tokens are plain string text (printable ASCII, no quote or backslash,
    so one character a byte), and the tokens by first byte (id, the bytes after it)."""
    cached = _index_cache.get(id(token_bytes))
    if cached is None or cached[0] is not token_bytes:
        by_first: dict[int, list] = {}
        for i, t in enumerate(token_bytes):
            if t:
                by_first.setdefault(t[0], []).append((i, t[1:]))
        cached = (token_bytes, [bool(t) and _PLAIN_BYTES.issuperset(t) for t in token_bytes], by_first)
        _index_cache[id(token_bytes)] = cached
    return cached[1:]


_STRING_SPECIAL = frozenset(b'"\\') | frozenset(range(0x20))


def _regex_walk(states: frozenset):
    """For one state inside a pattern string (no escape pending, no length to count) or a regex's text:
    a test of the bytes that follow, run on the regex's DFA alone, as ints; where a byte is one the frame
    handles itself (a quote, a backslash, a control character, or any byte after a regex's whole match)
    the whole machine walks them. None for other states."""
    state = next(iter(states)) if len(states) == 1 else None
    frame = state[0] if state is not None else ("",)
    if frame[0] == "pstr" and not frame[3] and not (frame[1].min_len or frame[1].max_len is not None):
        regex, special, text = frame[1].pattern, _STRING_SPECIAL, False
    elif frame[0] == "rx":
        regex, special, text = frame[1], frozenset(), True
    else:
        return None

    def walk(data: bytes) -> bool:
        at = frame[2]
        for byte in data:
            if byte in special or (text and regex.ends(at)):
                return bool(_walk_all(data, states))
            at = regex.step(at, byte)
            if at < 0:
                return False
        return True

    return walk


def _walk_all(data: bytes, states: frozenset) -> frozenset:
    for byte in data:
        states = frozenset(s for state in states if state is not None for s in _step(state, byte))
        if not states:
            break
    return states


def _plain_string_room(state) -> Optional[float]:
    """Inside a string with no escape or character pending: how many more characters its maxLength
    allows (infinite without one); None elsewhere."""
    if state is None or state[0][0] != "str":
        return None
    _, spec, escape, count, pending = state[0]
    if escape or pending:
        return None
    return float("inf") if spec.max_len is None else spec.max_len - count


# The machine. A state is a stack: (frame, rest) with rest another stack, or None once the document
# is complete. _step(state, byte) returns every state the byte may lead to (none: refused).

def _can_end(state) -> bool:
    if state is None:
        return True
    frame, rest = state
    if frame[0] == "bnum":
        return _in_bounds(frame[1], frame[2]) and _can_end(rest)
    if frame[0] == "rx":
        return frame[1].accepts(frame[2]) and _can_end(rest)
    if frame[0] == "gb":
        return frame[1].closure(frame[2], rest)[1]
    return frame[0] == "num" and frame[1] in ("zero", "int", "frac", "exp") and _can_end(rest)


def _step(state, b: int) -> list:
    frame, rest = state
    return _HANDLERS[frame[0]](frame, rest, b)


def _value(frame, rest, b):
    _, spec, ws = frame
    if b in _WS and ws < MAX_WHITESPACE:
        return [(("val", spec, ws + 1), rest)]
    return _start(spec, rest, b)  # a JSON value never starts with a space; a choice or a regex's text may


def _start(spec: Spec, rest, b: int) -> list:
    """The states after a value's first byte."""
    if spec.alternatives is not None:
        return [s for alt in spec.alternatives for s in _start(alt, rest, b)]
    if spec.literals is not None:
        return [_literal_from(text, 1, rest) for text in spec.literals if text[0] == b]
    if spec.text is not None:
        return _regex_text(("rx", spec.text, spec.text.start), rest, b)
    if spec.rules is not None:
        return _grammar_text(("gb", spec.rules, spec.rules.start), rest, b)
    kinds, out = spec.types, []
    if b == 0x22 and "string" in kinds:  # "
        out.append((("pstr", spec, spec.pattern.start, 0, 0) if spec.pattern else ("str", spec, 0, 0, 0), rest))
    elif b == 0x7B and "object" in kinds:  # {
        out.append((("obj", spec, 0, "first", 0, None), rest))
    elif b == 0x5B and "array" in kinds:  # [
        out.append((("arr", spec, 0, "first", 0), rest))
    elif (b in _DIGITS or b == 0x2D) and kinds & {"number", "integer"}:
        if spec.low is not None or spec.high is not None:
            return _bounded_number(spec, b"", rest, b)
        phase = "sign" if b == 0x2D else "zero" if b == 0x30 else "int"
        out.append((("num", phase, "number" not in kinds, 1), rest))
    else:
        for word, kind in ((b"true", "boolean"), (b"false", "boolean"), (b"null", "null")):
            if kind in kinds and word[0] == b:
                out.append(_literal_from(word, 1, rest))
    return out


def _literal_from(text: bytes, pos: int, rest):
    return rest if pos == len(text) else (("lit", text, pos), rest)


def _literal_byte(frame, rest, b):
    _, text, pos = frame
    return [_literal_from(text, pos + 1, rest)] if text[pos] == b else []


def _string(frame, rest, b):
    """A string's bytes: escapes checked, control characters refused, UTF-8 kept whole (a character's
    continuation bytes only after its lead byte), and characters counted where a length bound needs it."""
    _, spec, escape, count, pending = frame
    if pending:
        return [(("str", spec, 0, count, pending - 1), rest)] if 0x80 <= b < 0xC0 else []
    if escape == 1:  # after a backslash
        if b == 0x75:  # u: four hex digits follow
            return [(("str", spec, 5, count, 0), rest)]
        return [(("str", spec, 0, count, 0), rest)] if b in b'"\\/bfnrt' else []
    if escape:
        return [(("str", spec, escape - 1 if escape > 2 else 0, count, 0), rest)] if b in _HEX else []
    if b == 0x22:
        return [rest] if count >= spec.min_len else []
    if b < 0x20 or 0x80 <= b < 0xC2 or b > 0xF4:
        return []
    if spec.min_len or spec.max_len is not None:
        count += 1
        if spec.max_len is not None and count > spec.max_len:
            return []
    follow = 0 if b < 0x80 else 1 if b < 0xE0 else 2 if b < 0xF0 else 3
    return [(("str", spec, 1 if b == 0x5C else 0, count, follow), rest)]


_JSON_ESCAPES = {0x22: 0x22, 0x5C: 0x5C, 0x2F: 0x2F, 0x62: 0x08, 0x66: 0x0C, 0x6E: 0x0A, 0x72: 0x0D, 0x74: 0x09}


def _pattern_string(frame, rest, b):
    """A string whose characters match a regex: each byte, or an escape's character, steps the regex
    (which also keeps UTF-8 whole); characters counted where a length bound needs it. \\uXXXX escapes
    are not written here: the character itself is."""
    _, spec, at, escape, count = frame
    if escape:
        b = _JSON_ESCAPES.get(b, -1)
    elif b == 0x22:
        return [rest] if spec.pattern.accepts(at) and count >= spec.min_len else []
    elif b == 0x5C:  # only where some escape's character may come next
        room = spec.max_len is None or count < spec.max_len
        return [(("pstr", spec, at, 1, count), rest)] if room and any(
            spec.pattern.step(at, c) >= 0 for c in _JSON_ESCAPES.values()) else []
    elif b < 0x20:
        b = -1  # a control character must be escaped
    at = spec.pattern.step(at, b) if b >= 0 else -1
    if at < 0:
        return []
    if spec.min_len or spec.max_len is not None:
        count += not 0x80 <= b < 0xC0  # a character's first byte
        if not _length_can_fit(spec, at, count):
            return []
    return [(("pstr", spec, at, 0, count), rest)]


def _length_can_fit(spec: Spec, at: int, count: int) -> bool:
    """Some whole match of the pattern from DFA state `at`, `count` characters written, ends within the
    string's length bounds: a character that leaves none is refused, so the string never dead-ends."""
    pattern = spec.pattern
    if spec.max_len is not None and count + pattern.fewest_chars_to_match(at) > spec.max_len:
        return False
    return count >= spec.min_len or count + pattern.most_chars_to_match(at, spec.min_len) >= spec.min_len


def _regex_text(frame, rest, b):
    """Raw text a regex matches whole; complete (the stack pops) once no byte may extend the match."""
    _, regex, at = frame
    at = regex.step(at, b)
    if at < 0:
        return []
    return [rest] if regex.ends(at) else [(("rx", regex, at), rest)]


def _grammar_text(frame, rest, b):
    """Raw text a grammar matches: the byte read from every state the rules reach without reading
    (calls pushed, matched rules popped); complete once nothing may follow."""
    _, grammar, state = frame
    out = []
    for at, stack in grammar.closure(state, rest)[0]:
        for lo, hi, to in grammar.nfa.edges[at]:
            if lo <= b <= hi:
                following, can_end = grammar.closure(to, stack)
                out.append((("gb", grammar, to), stack) if following or not can_end else None)
    return out


_NUMBER_MOVES = {  # phase -> (digit, '.', 'e'/'E', sign) successors; None: not allowed
    "sign": ("int", None, None, None), "zero": (None, "dot", "e", None), "int": ("int", "dot", "e", None),
    "dot": ("frac", None, None, None), "frac": ("frac", None, "e", None), "e": ("exp", None, None, "esign"),
    "esign": ("exp", None, None, None), "exp": ("exp", None, None, None),
}


def _number(frame, rest, b):
    _, phase, integer, length = frame
    digit, dot, exp, sign = _NUMBER_MOVES[phase]
    if phase == "sign" and b == 0x30:
        digit = "zero"
    nxt = (digit if b in _DIGITS else dot if b == 0x2E else exp if b in b"eE" else sign if b in b"+-" else None)
    if nxt in ("dot", "e") and integer:
        nxt = None
    if nxt is not None and length < MAX_NUMBER_BYTES:
        return [(("num", nxt, integer, length + 1), rest)]
    if phase in ("zero", "int", "frac", "exp") and rest is not None:
        return _step(rest, b)  # the number ended; the byte belongs to what holds it
    return []


_BOUNDED_PREFIX = {False: re.compile(rb"-?(0|[1-9][0-9]*)?"), True: re.compile(rb"-?((0|[1-9][0-9]*)(\.[0-9]*)?)?")}
_BOUNDED_WHOLE = re.compile(rb"-?(0|[1-9][0-9]*)(\.[0-9]+)?")


def _bounded_number(spec: Spec, text: bytes, rest, b: int) -> list:
    """A number with bounds, written so far as `text` (no exponent; a fraction where the type is number):
    a byte is allowed where some way to go on (more digits, or the end) lands within them."""
    longer = text + bytes([b])
    fits = len(longer) < MAX_NUMBER_BYTES or (len(longer) == MAX_NUMBER_BYTES and _BOUNDED_WHOLE.fullmatch(longer))
    if fits and _BOUNDED_PREFIX["number" in spec.types].fullmatch(longer):
        return [(("bnum", spec, longer), rest)] if _reachable(spec, longer) else []
    if _in_bounds(spec, text) and rest is not None:
        return _step(rest, b)  # the number ended; the byte belongs to what holds it
    return []


def _bounded(frame, rest, b):
    return _bounded_number(frame[1], frame[2], rest, b)


def _in_bounds(spec: Spec, text: bytes) -> bool:
    if not _BOUNDED_WHOLE.fullmatch(text):
        return False
    value = Fraction(text.decode())
    return _meets(spec, value, True, value, True)


def _meets(spec: Spec, lo, lo_in: bool, hi, hi_in: bool) -> bool:
    """Whether the span of values lo..hi (each end inclusive or not; None: unbounded) meets the bounds."""
    if spec.low is not None:
        if lo is None or lo < spec.low[0]:
            lo, lo_in = spec.low
        elif lo == spec.low[0]:
            lo_in = lo_in and spec.low[1]
    if spec.high is not None:
        if hi is None or hi > spec.high[0]:
            hi, hi_in = spec.high
        elif hi == spec.high[0]:
            hi_in = hi_in and spec.high[1]
    return lo is None or hi is None or lo < hi or (lo == hi and lo_in and hi_in)


def _reachable(spec: Spec, text: bytes) -> bool:
    """Whether `text` (a prefix of a number) or some number it begins is within the bounds: the values
    it may still become are spans, one per count of integer digits to come."""
    negative, fraction = text.startswith(b"-"), "number" in spec.types
    whole, dot, digits = text.lstrip(b"-").partition(b".")
    if not whole:  # a sign at most: any size
        spans = [(Fraction(0), True, None, False)]
    elif dot:  # 12.3 -> [12.3, 12.4)
        least = Fraction(f"{whole.decode()}.{digits.decode() or 0}")
        spans = [(least, True, least + Fraction(1, 10 ** len(digits)), False)]
    elif whole == b"0":
        spans = [(Fraction(0), True, Fraction(1) if fraction else Fraction(0), not fraction)]
    else:  # 12 -> 12..12.99, 120..129.99, ...: a span per count of digits still to come
        value, room = int(whole), MAX_NUMBER_BYTES - len(text)
        spans = [(Fraction(value * 10 ** more), True, Fraction((value + 1) * 10 ** more - (0 if fraction else 1)),
                  not fraction) for more in range(room + 1)]
    # Spans grow in size: past the bound on the far side, no later one meets.
    far = spec.low if negative else spec.high
    for lo, lo_in, hi, hi_in in spans:
        if far is not None and lo > abs(far[0]) and (far[0] < 0) == negative:
            break
        if negative:  # below zero: a minus sign is never how zero is written here
            lo, lo_in, hi, hi_in = (None if hi is None else -hi), hi_in, -lo, lo_in and lo != 0
        if _meets(spec, lo, lo_in, hi, hi_in):
            return True
    return False


def _object(frame, rest, b):
    _, spec, at, phase, ws, pending = frame  # at: declared properties behind (spec.next_keys)
    if b in _WS:
        return [(("obj", spec, at, phase, ws + 1, pending), rest)] if ws < MAX_WHITESPACE else []
    if phase in ("first", "key") and b == 0x22:
        if spec.props is None:  # any key: a plain string, then its value is spec.extra
            return [(("str", _KEY, 0, 0, 0), (("obj", spec, at, "colon", 0, None), rest))]
        return [(("key", spec, at, b""), rest)] if spec.next_keys[at] else []
    if phase == "colon" and b == 0x3A:
        value = spec.extra if pending is None else spec.props[pending]
        return [(("val", value, 0), (("obj", spec, at, "next", 0, None), rest))]
    if phase == "next" and b == 0x2C:
        more = spec.props is None or spec.next_keys[at]
        return [(("obj", spec, at, "key", 0, None), rest)] if more else []
    if phase in ("first", "next") and b == 0x7D:
        return [rest] if spec.props is None or spec.closable[at] else []
    return []


def _key(frame, rest, b):
    """A declared property's name, byte by byte: only names that may come next (in schema order) fit."""
    _, spec, at, prefix = frame
    eligible = spec.next_keys[at]
    out = []
    if b == 0x22 and prefix in eligible:
        out.append((("obj", spec, eligible[prefix], "colon", 0, prefix), rest))
    longer = prefix + bytes([b])
    if any(k.startswith(longer) for k in eligible):
        out.append((("key", spec, at, longer), rest))
    return out


def _array(frame, rest, b):
    _, spec, count, phase, ws = frame
    if b in _WS:
        return [(("arr", spec, count, phase, ws + 1), rest)] if ws < MAX_WHITESPACE else []
    if b == 0x5D:  # ]
        return [rest] if count >= spec.min_items else []
    bounded = spec.min_items or spec.max_items is not None  # count items only where a bound needs it
    if phase == "next":
        if b != 0x2C or (spec.max_items is not None and count >= spec.max_items):
            return []
        return [(("val", spec.items, 0), (("arr", spec, count + 1 if bounded else 0, "next", 0), rest))]
    if spec.max_items == 0:
        return []
    return _start(spec.items, (("arr", spec, 1 if bounded else 0, "next", 0), rest), b)


_KEY = Spec()
_KEY.types = frozenset({"string"})
_HANDLERS = {"val": _value, "lit": _literal_byte, "str": _string, "pstr": _pattern_string, "rx": _regex_text,
             "gb": _grammar_text, "num": _number, "bnum": _bounded, "obj": _object, "key": _key, "arr": _array}
