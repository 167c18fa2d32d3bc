"""Regular expressions as byte automata, for guided decoding: a JSON Schema string's `pattern` (and
the `format`s in FORMATS), and vLLM's guided regex.

A pattern parses into a small tree of character sets, sequences, alternatives and repeats, compiles
into a Thompson NFA over UTF-8 bytes (each character set becomes the byte sequences that spell its
characters, so every accepted path is valid UTF-8, and a byte-level token may end inside a
character), and runs as a DFA built lazily: a (state, byte) step is computed once and cached. A match
is whole, as Outlines and xgrammar read a schema's pattern: a leading ^ and a trailing $ are implied.

The syntax is what JSON Schema patterns and Pydantic write, the common part of ECMAScript's and
Python's: literals and escapes, `.`, classes (`[a-z]`, `[^...]`, `\\d \\w \\s` and their negations,
ASCII as in ECMAScript without the u flag; `\\s` ECMAScript's), groups (plain, `(?:...)`, named),
`|`, and `* + ? {n} {n,} {n,m}` (lazy forms match the same strings). Anything else that changes what
matches (lookaround, backreferences, `\\b`, inline flags, possessive repeats, anchors inside the
pattern) is a RegexError naming it, never read as something else.
"""

from __future__ import annotations

import math
import re
from collections import deque
from typing import Optional

MAX_NFA_STATES = 20_000  # NFA states; a pattern past this (large counted repeats) is refused
MAX_DFA_STATES = 100_000  # built lazily; past this a pattern's transitions are computed again as needed
UNICODE_MAX = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)  # not characters: UTF-8 cannot spell them

Ranges = list[tuple[int, int]]  # sorted, disjoint, inclusive code point ranges


class RegexError(ValueError):
    """A pattern this module cannot compile; the message says what and where."""


def _normalize(ranges: Ranges) -> Ranges:
    """Sorted, merged, without surrogates."""
    out: Ranges = []
    for lo, hi in sorted(ranges):
        for a, b in ((lo, min(hi, _SURROGATES[0] - 1)), (max(lo, _SURROGATES[1] + 1), hi)):
            if a > b:
                continue
            if out and a <= out[-1][1] + 1:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
    return out


def _complement(ranges: Ranges) -> Ranges:
    out, start = [], 0
    for lo, hi in _normalize(ranges):
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= UNICODE_MAX:
        out.append((start, UNICODE_MAX))
    return _normalize(out)


def _chars(text: str) -> Ranges:
    return [(ord(c), ord(c)) for c in text]


_DIGIT = [(0x30, 0x39)]
_WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE = _normalize(_chars("\t\n\v\f\r \u00a0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff") + [(0x2000, 0x200A)])
_CLASS_ESCAPES = {"d": _DIGIT, "w": _WORD, "s": _SPACE,
                  "D": _complement(_DIGIT), "W": _complement(_WORD), "S": _complement(_SPACE)}
_CONTROL_ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B, "0": 0x00}
ANY_CHARACTER = _complement(_chars("\n\r\u2028\u2029"))  # `.`: any character but a line terminator
_REPEAT = re.compile(r"\{(\d+)(,(\d*))?\}")
_NO_LEAST = re.compile(r"\{,(\d+)\}")  # Python's {,n}; a literal in ECMAScript: refused as ambiguous
_HEX_ESCAPES = {"x": 2, "u": 4}


class PatternParser:
    """Recursive descent into nodes: ("set", ranges), ("cat", [nodes]), ("alt", [nodes]),
    ("rep", node, least, most or None)."""

    def __init__(self, pattern: str):
        self.text, self.i = pattern, 0

    def parse(self):
        if self.text.startswith("^"):
            self.i = 1
        node = self.alternation()
        if self.i < len(self.text):  # only an unmatched ')' stops alternation() early
            raise RegexError(f"unbalanced ')' at position {self.i}")
        return node

    def peek(self) -> str:
        return self.text[self.i] if self.i < len(self.text) else ""

    def alternation(self):
        branches = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def sequence(self):
        items = []
        while self.peek() not in ("", "|", ")"):
            if self.peek() == "$" and self.i == len(self.text) - 1:
                self.i += 1  # the implied end
                break
            items.append(self.repeat(self.atom()))
        return ("cat", items)

    def atom(self):
        start, c = self.i, self.peek()
        self.i += 1
        if c == "(":
            return self.group(start)
        if c == "[":
            return ("set", self.char_class(start))
        if c == ".":
            return ("set", ANY_CHARACTER)
        if c == "\\":
            return ("set", self.escape(in_class=False))
        if c in "^$":
            raise RegexError(f"'{c}' at position {start}: anchors are implied at the pattern's ends and "
                             "not supported inside it")
        if c in "*+?" or (c == "{" and _REPEAT.match(self.text, start)):
            raise RegexError(f"'{c}' at position {start} has nothing to repeat")
        if c == "{" and (m := _NO_LEAST.match(self.text, start)):
            raise RegexError(f"'{m[0]}' at position {start}: write the least count too ({{0,{m[1]}}})")
        return ("set", [(ord(c), ord(c))])

    def group(self, start: int):
        if self.text.startswith("?:", self.i):
            self.i += 2
        elif self.text.startswith(("?P<", "?<"), self.i) and not self.text.startswith(("?<=", "?<!"), self.i):
            end = self.text.find(">", self.i)
            if end < 0:
                raise RegexError(f"unterminated group name at position {start}")
            self.i = end + 1
        elif self.peek() == "?":
            raise RegexError(f"'(?{self.text[self.i + 1:self.i + 2]}' at position {start}: lookaround, inline "
                             "flags and other extensions are not supported")
        node = self.alternation()
        if self.peek() != ")":
            raise RegexError(f"missing ')' for the group at position {start}")
        self.i += 1
        return node

    def repeat(self, node):
        c = self.peek()
        if c in ("*", "+", "?"):
            least, most = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            self.i += 1
        elif c == "{" and (m := _REPEAT.match(self.text, self.i)):
            least = int(m[1])
            most = least if m[2] is None else int(m[3]) if m[3] else None
            if most is not None and most < least:
                raise RegexError(f"'{m[0]}' at position {self.i}: the maximum is below the minimum")
            self.i = m.end()
        else:
            return node
        if self.peek() == "?":
            self.i += 1  # lazy: the same strings match
        elif self.peek() == "+":
            raise RegexError(f"possessive repeat at position {self.i} is not supported")
        return ("rep", node, least, most)

    def char_class(self, start: int) -> Ranges:
        negate = self.peek() == "^"
        self.i += negate
        ranges: Ranges = []
        first = True
        while self.peek() != "]" or first:
            if not self.peek():
                raise RegexError(f"missing ']' for the class at position {start}")
            first = False
            low = self.class_atom()
            if self.peek() == "-" and self.text[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                high = self.class_atom()
                if len(low) != 1 or len(high) != 1 or low[0][0] != low[0][1] or high[0][0] != high[0][1]:
                    raise RegexError(f"a class range at position {start} must run between two characters")
                if high[0][0] < low[0][0]:
                    raise RegexError(f"the class range at position {start} runs backwards")
                ranges.append((low[0][0], high[0][0]))
            else:
                ranges += low
        self.i += 1
        return _complement(ranges) if negate else _normalize(ranges)

    def class_atom(self) -> Ranges:
        c = self.peek()
        self.i += 1
        return self.escape(in_class=True) if c == "\\" else [(ord(c), ord(c))]

    def escape(self, in_class: bool) -> Ranges:
        at, c = self.i - 1, self.peek()
        if not c:
            raise RegexError("the pattern ends in a lone backslash")
        self.i += 1
        if c in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[c]
        if c in _CONTROL_ESCAPES and not (c == "0" and self.peek().isdigit()):
            return [(_CONTROL_ESCAPES[c],) * 2]
        if c == "b" and in_class:
            return [(0x08, 0x08)]
        if c in _HEX_ESCAPES:
            digits = self.text[self.i:self.i + _HEX_ESCAPES[c]]
            if len(digits) != _HEX_ESCAPES[c] or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise RegexError(f"'\\{c}' at position {at} needs {_HEX_ESCAPES[c]} hex digits")
            self.i += len(digits)
            return [(int(digits, 16),) * 2]
        if c.isalnum():
            raise RegexError(f"'\\{c}' at position {at} is not supported (backreferences, \\b, \\p{{...}} "
                             "and other escapes that are not a character or a class)")
        return [(ord(c), ord(c))]


def _utf8_sequences(lo: int, hi: int) -> list[list[tuple[int, int]]]:
    """Byte-range sequences that spell exactly the UTF-8 encodings of code points lo..hi (surrogates
    excluded by the caller): split until each piece's encodings differ only in a range per byte."""
    for bound in (0x7F, 0x7FF, 0xFFFF):  # pieces of one encoded length
        if lo <= bound < hi:
            return _utf8_sequences(lo, bound) + _utf8_sequences(bound + 1, hi)
    if hi < 0x80:
        return [[(lo, hi)]]
    for tail in range(1, 4):  # continuation bytes that must range fully for one sequence to cover it
        mask = (1 << (6 * tail)) - 1
        if lo & ~mask != hi & ~mask:
            if lo & mask:
                return _utf8_sequences(lo, lo | mask) + _utf8_sequences((lo | mask) + 1, hi)
            if hi & mask != mask:
                return _utf8_sequences(lo, (hi & ~mask) - 1) + _utf8_sequences(hi & ~mask, hi)
    a, b = chr(lo).encode(), chr(hi).encode()
    return [list(zip(a, b))]


class ByteNfa:
    """States 0..n-1, each with byte-range edges (lo, hi, target), empty moves, and (in a grammar,
    lm.ebnf_guide) calls of other rules: (rule name, the state the call returns to)."""

    def __init__(self):
        self.edges: list[list[tuple[int, int, int]]] = []
        self.empty: list[list[int]] = []
        self.calls: list[list[tuple[str, int]]] = []

    def new(self) -> int:
        if len(self.edges) >= MAX_NFA_STATES:
            raise RegexError(f"the pattern is too large (more than {MAX_NFA_STATES} automaton states; "
                             "large counted repeats multiply)")
        self.edges.append([])
        self.empty.append([])
        self.calls.append([])
        return len(self.edges) - 1

    def build(self, node, start: int) -> int:
        """Add `node` matched from `start`; returns the state its match ends in."""
        kind = node[0]
        if kind == "set":
            end = self.new()
            for sequence in (s for lo, hi in node[1] for s in _utf8_sequences(lo, hi)):
                at = start
                for i, (lo, hi) in enumerate(sequence):
                    to = end if i == len(sequence) - 1 else self.new()
                    self.edges[at].append((lo, hi, to))
                    at = to
            return end
        if kind == "ref":  # a grammar's rule, matched where the call is made
            end = self.new()
            self.calls[start].append((node[1], end))
            return end
        if kind == "cat":
            for item in node[1]:
                start = self.build(item, start)
            return start
        if kind == "alt":
            end = self.new()
            for branch in node[1]:
                self.empty[self.build(branch, start)].append(end)
            return end
        _, inner, least, most = node
        for _ in range(least):
            start = self.build(inner, start)
        if most is None:  # a loop: the state before each further copy is also the end
            loop = self.new()
            self.empty[start].append(loop)
            self.empty[self.build(inner, loop)].append(loop)
            return loop
        end = self.new()
        for _ in range(most - least):
            self.empty[start].append(end)
            start = self.build(inner, start)
        self.empty[start].append(end)
        return end


class Regex:
    """A compiled pattern. DFA states are ints; `step` returns -1 where the byte is refused."""

    def __init__(self, pattern: str, tree=None):
        """`tree`: the pattern already parsed (PatternParser's nodes), e.g. a regular grammar's."""
        if not isinstance(pattern, str):
            raise RegexError("a pattern must be a string")
        self.pattern = pattern
        self._nfa = ByteNfa()
        begin = self._nfa.new()
        self._final = self._nfa.build(PatternParser(pattern).parse() if tree is None else tree, begin)
        self._sets: list[frozenset[int]] = []
        self._ids: dict[frozenset[int], int] = {}
        self._steps: list[dict[int, int]] = []  # per DFA state: byte -> next state, as computed
        self._ends: dict[int, bool] = {}
        self._fewest: Optional[list[float]] = None  # per NFA state: fewest characters to the final state
        self._most: dict[int, list[int]] = {}  # per cap: per NFA state, most characters to it (capped)
        self._to_match: dict[tuple, float] = {}  # the two below, per (cap or None, DFA state)
        self.start = self._state({begin})

    def _state(self, nfa_states: set[int]) -> int:
        """The DFA state of these NFA states and all they reach by empty moves."""
        todo, seen = list(nfa_states), set(nfa_states)
        while todo:
            for t in self._nfa.empty[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        key = frozenset(seen)
        if key not in self._ids:
            self._ids[key] = len(self._sets)
            self._sets.append(key)
            self._steps.append({})
        return self._ids[key]

    def step(self, state: int, byte: int) -> int:
        found = self._steps[state].get(byte)
        if found is None:
            targets = {to for s in self._sets[state] for lo, hi, to in self._nfa.edges[s] if lo <= byte <= hi}
            found = self._state(targets) if targets else -1
            if len(self._sets) < MAX_DFA_STATES:
                self._steps[state][byte] = found
        return found

    def accepts(self, state: int) -> bool:
        """What was read is a whole match."""
        return self._final in self._sets[state]

    def ends(self, state: int) -> bool:
        """A whole match that no byte may extend."""
        found = self._ends.get(state)
        if found is None:
            found = self._ends[state] = self.accepts(state) and not any(self._nfa.edges[s] for s in self._sets[state])
        return found

    # Characters still to write, for a string whose length is bounded too (a JSON Schema's pattern with
    # minLength/maxLength): taken on the NFA, as a DFA state's completions are its NFA states'. A byte
    # edge counts one character unless it is a UTF-8 continuation byte.

    def _weighted_edges(self, state: int):
        for lo, hi, to in self._nfa.edges[state]:
            yield to, 0 if 0x80 <= lo and hi <= 0xBF else 1
        for to in self._nfa.empty[state]:
            yield to, 0

    def fewest_chars_to_match(self, state: int) -> float:
        """The fewest characters after which what was read is a whole match (inf: never)."""
        found = self._to_match.get((None, state))
        if found is not None:
            return found
        if self._fewest is None:
            reverse: list[list[tuple[int, int]]] = [[] for _ in self._nfa.edges]
            for s in range(len(self._nfa.edges)):
                for to, weight in self._weighted_edges(s):
                    reverse[to].append((s, weight))
            fewest = [math.inf] * len(reverse)
            fewest[self._final], todo = 0, deque([self._final])
            while todo:  # 0-1 breadth-first search from the final state, backwards
                t = todo.popleft()
                for s, weight in reverse[t]:
                    if fewest[t] + weight < fewest[s]:
                        fewest[s] = fewest[t] + weight
                        todo.append(s) if weight else todo.appendleft(s)
            self._fewest = fewest
        found = self._to_match[None, state] = min(self._fewest[s] for s in self._sets[state])
        return found

    def most_chars_to_match(self, state: int, cap: int) -> int:
        """The most characters, up to `cap`, after which what was read is a whole match (-1: never)."""
        found = self._to_match.get((cap, state))
        if found is not None:
            return found
        most = self._most.get(cap)
        if most is None:
            most = [-1] * len(self._nfa.edges)
            most[self._final], changed = 0, True
            while changed:  # values only grow, and stay <= cap: this ends
                changed = False
                for s in reversed(range(len(most))):  # edges mostly lead to later states
                    for to, weight in self._weighted_edges(s):
                        if most[to] >= 0 and min(cap, most[to] + weight) > most[s]:
                            most[s], changed = min(cap, most[to] + weight), True
            self._most[cap] = most
        found = self._to_match[cap, state] = max(most[s] for s in self._sets[state])
        return found

    def fullmatch(self, data: bytes) -> bool:
        state = self.start
        for byte in data:
            state = self.step(state, byte)
            if state < 0:
                return False
        return self.accepts(state)


# JSON Schema formats enforced, as regexes over the string's characters (RFC 3339 dates and times,
# RFC 4122 UUIDs, dotted IPv4, a plain address for email); other formats stay annotations.
_DATE = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
_TIME = r"([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d{1,9})?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)"
_OCTET = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": _DATE + "T" + _TIME,
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "ipv4": rf"({_OCTET}\.){{3}}{_OCTET}",
    "email": rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~-]+)*@{_LABEL}(\.{_LABEL})+",
}
