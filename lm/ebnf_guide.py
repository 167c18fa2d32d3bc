"""Context-free grammars in GBNF, llama.cpp's EBNF (what vLLM's `structured_outputs.grammar` and
xgrammar take), for guided decoding.

    root   ::= answer ("." | "!")?
    answer ::= "yes" | "no" | number
    number ::= [0-9]+   # a comment

A rule is `name ::= body` (a body may run over several lines); items are "literals" (with \\n, \\t,
\\", \\\\, \\xHH, \\uHHHH escapes), character classes as in lm.regex_guide (`[a-z]`, `[^"\\\\]`), `.`,
rule names, groups in parentheses, `|`, and `* + ? {m} {m,} {m,n}`; `root` is where output starts.
Each rule's body compiles into lm.regex_guide's byte NFA, with call edges for the rules it names;
output is followed by a stack of (rule, state) frames, so rules may nest and recurse (but not
left-recursively: a rule that may call itself before reading a byte is refused, as in llama.cpp).
A grammar whose rules do not recurse is a regular language: `Grammar.as_regex` writes every call
out in place, and guided decoding runs it as one regex's DFA instead of the stack machine.
"""

from __future__ import annotations

import re
from typing import Optional

from lm.regex_guide import MAX_NFA_STATES, ByteNfa, PatternParser, Regex, RegexError

_RULE = re.compile(r"^[ \t]*([A-Za-z][A-Za-z0-9_-]*)[ \t]*::=", re.M)
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_BLANK = re.compile(r"(?:\s+|#[^\n]*)+")
MAX_CLOSURES = 200_000  # cached (state, stack) closures per grammar


class _RuleParser(PatternParser):
    """A rule's body: the regex parser's classes, escapes and repeats, with blanks and comments
    between items, "literals" and rule names."""

    def skip(self) -> None:
        if m := _BLANK.match(self.text, self.i):
            self.i = m.end()

    def parse(self):
        node = self.alternation()
        if self.i < len(self.text):
            raise RegexError(f"unbalanced ')' at position {self.i}")
        return node

    def sequence(self):
        items = []
        while True:
            self.skip()
            if self.peek() in ("", "|", ")"):
                return ("cat", items)
            items.append(self.repeat(self.atom()))

    def repeat(self, node):
        before = self.i
        self.skip()
        if self.peek() in ("*", "+", "?", "{"):
            return super().repeat(node)
        self.i = before
        return node

    def atom(self):
        start, c = self.i, self.peek()
        if c == '"':
            return self.literal(start)
        if name := _NAME.match(self.text, self.i):
            self.i = name.end()
            return ("ref", name[0])
        if c == "(":
            self.i += 1
            node = self.alternation()
            if self.peek() != ")":
                raise RegexError(f"missing ')' for the group at position {start}")
            self.i += 1
            return node
        if c in ("[", "."):
            return super().atom()
        raise RegexError(f"{c!r} at position {start} is not a literal, class, rule name or group")

    def literal(self, start: int):
        self.i += 1
        codes = []
        while self.peek() != '"':
            if not self.peek():
                raise RegexError(f"the string at position {start} is not closed")
            c = self.peek()
            self.i += 1
            if c == "\\":
                (low, high), *more = self.escape(in_class=False)
                if more or low != high:
                    raise RegexError(f"a class escape in the string at position {start}: write it outside the quotes")
                codes.append(low)
            else:
                codes.append(ord(c))
        self.i += 1
        return ("cat", [("set", [(code, code)]) for code in codes])


class Grammar:
    """A compiled grammar. A position is (state, stack): an NFA state with byte edges, and the frames
    of the rules that called the one it is in (None at the root)."""

    def __init__(self, text: str):
        if not isinstance(text, str):
            raise RegexError("a grammar must be a string")
        self.text = text
        heads = list(_RULE.finditer(text))
        if not heads or _BLANK.sub("", text[:heads[0].start()]):
            raise RegexError("expected rules of the form 'name ::= ...' (output starts at the rule 'root')")
        self.nfa = ByteNfa()
        self.trees: dict[str, tuple] = {}  # each rule's parsed body
        self.starts: dict[str, int] = {}
        self.finals: set[int] = set()
        for head, after in zip(heads, heads[1:] + [None]):
            name, body = head[1], text[head.end():after.start() if after else len(text)]
            if name in self.starts:
                raise RegexError(f"rule '{name}' is defined twice")
            self.starts[name] = self.nfa.new()
            try:
                tree = self.trees[name] = _RuleParser(body).parse()
            except RegexError as error:  # positions count from the rule's '::='
                raise RegexError(f"rule '{name}': {error}") from None
            self.finals.add(self.nfa.build(tree, self.starts[name]))
        undefined = sorted({rule for calls in self.nfa.calls for rule, _ in calls} - set(self.starts))
        if undefined:
            raise RegexError(f"rule '{undefined[0]}' is used but not defined")
        if "root" not in self.starts:
            raise RegexError("no 'root' rule: output starts there")
        self._check_left_recursion()
        self._closures: dict[tuple, tuple[tuple, bool]] = {}

    def _free_moves(self, state: int, nullable: set[str]):
        """States reachable from `state` without reading a byte (calls of nullable rules stepped over),
        and the rules called on the way."""
        seen, todo, called = {state}, [state], set()
        while todo:
            q = todo.pop()
            nxt = list(self.nfa.empty[q])
            for rule, back in self.nfa.calls[q]:
                called.add(rule)
                if rule in nullable:
                    nxt.append(back)
            for t in nxt:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return seen, called

    def _check_left_recursion(self) -> None:
        nullable: set[str] = set()
        while True:  # the rules that may match nothing, to a fixed point
            more = {name for name, start in self.starts.items()
                    if name not in nullable and self._free_moves(start, nullable)[0] & self.finals}
            if not more:
                break
            nullable |= more
        first = {name: self._free_moves(start, nullable)[1] for name, start in self.starts.items()}
        for name in self.starts:  # a rule reaching itself through first calls loops without reading
            seen, todo = set(), list(first[name])
            while todo:
                rule = todo.pop()
                if rule == name:
                    raise RegexError(f"rule '{name}' is left-recursive (it may call itself before reading "
                                     "anything): write the repetition with * or +")
                if rule not in seen:
                    seen.add(rule)
                    todo += first[rule]

    def as_regex(self) -> Optional[Regex]:
        """The grammar as one regex (guided by a DFA, far cheaper than the stack machine), where no rule
        reaches itself, so every call can be written out in place; None for a recursive grammar, or
        one too large written out."""
        class NotRegular(Exception):
            pass

        size = [0]  # nodes written out: rules called from many places multiply

        def inline(node, calling: tuple):
            kind = node[0]
            size[0] += 1
            if size[0] > MAX_NFA_STATES:
                raise NotRegular
            if kind == "ref":
                if node[1] in calling:
                    raise NotRegular
                return inline(self.trees[node[1]], calling + (node[1],))
            if kind in ("cat", "alt"):
                return (kind, [inline(item, calling) for item in node[1]])
            if kind == "rep":
                return (kind, inline(node[1], calling), *node[2:])
            return node

        try:
            return Regex(self.text, tree=inline(self.trees["root"], ("root",)))
        except (NotRegular, RegexError):
            return None

    @property
    def start(self) -> int:
        return self.starts["root"]

    def closure(self, state: int, stack) -> tuple[tuple, bool]:
        """((state, stack) pairs with byte edges reachable without reading, whether the output may end)."""
        key = (state, stack)
        found = self._closures.get(key)
        if found is not None:
            return found
        todo, seen, out, can_end = [key], {key}, [], False
        while todo:
            q, below = todo.pop()
            if self.nfa.edges[q]:
                out.append((q, below))
            nxt = [(t, below) for t in self.nfa.empty[q]]
            nxt += [(self.starts[rule], (("gb", self, back), below)) for rule, back in self.nfa.calls[q]]
            if q in self.finals:  # the rule is matched: back to its caller, or the output is whole
                if below is None:
                    can_end = True
                else:
                    nxt.append((below[0][2], below[1]))
            for item in nxt:
                if item not in seen:
                    seen.add(item)
                    todo.append(item)
        if len(self._closures) >= MAX_CLOSURES:
            self._closures.clear()
        found = self._closures[key] = (tuple(out), can_end)
        return found
