"""GBNF grammars (lm.ebnf_guide) in guided decoding: a grammar accepts exactly its language, byte by
byte, recursion included; what cannot be followed (left recursion, undefined rules) is refused by name;
the vocabulary mask agrees with the grammar; a random model writes only text the grammar matches."""

import re

import pytest

from lm.engine import Engine, SamplingParams
from lm.ebnf_guide import Grammar
from lm.json_guide import JsonGrammar, SchemaError, Spec
from test_json_guide import TOKENIZER, accepts_whole, assert_the_mask_is_what_the_grammar_allows, random_model

ANSWER = r'''
root   ::= answer ("." | "!")?
answer ::= "yes" | "no" | number   # a comment
number ::= [1-9] [0-9]{0,3}
'''
ANSWER_RE = r"(yes|no|[1-9][0-9]{0,3})[.!]?"
NESTED = r'''root ::= "[" (item ("," item)*)? "]"
item ::= root | "x" | "\"q\\n\""'''


def stack_machine(text: str) -> JsonGrammar:
    """A grammar followed by its stack machine, even where its rules do not recurse."""
    root = Spec()
    root.rules = Grammar(text)
    return JsonGrammar(root=root, key="stack:" + text)


@pytest.mark.parametrize("text", ["yes", "yes.", "no!", "12", "9999!", "", "maybe", "yes..", "0", "12345", "no?"])
def test_a_grammar_accepts_what_the_same_language_as_a_regex_accepts(text):
    """Rules that do not recurse are written out as one regex; the stack machine reads the same."""
    regular = JsonGrammar.ebnf(ANSWER)
    assert regular.root.text is not None and JsonGrammar.ebnf(NESTED).root.rules is not None
    for grammar in (regular, stack_machine(ANSWER)):
        assert accepts_whole(grammar, text) == bool(re.fullmatch(ANSWER_RE, text))


def test_a_grammar_or_regex_that_matches_empty_text_may_end_before_any_byte():
    for grammar in (JsonGrammar.ebnf('root ::= ("a" "b")*'), stack_machine('root ::= ("a" "b")*'),
                    JsonGrammar.regex("(ab)*")):
        guide = grammar.guide()
        assert guide.can_end and guide.allows(b"ab") and not guide.allows(b"b")
    assert not JsonGrammar.regex("a+").guide().can_end and not JsonGrammar.ebnf('root ::= "a"+').guide().can_end


def test_a_grammar_too_large_written_out_keeps_its_stack_machine():
    doubling = "root ::= r0\n" + "".join(f"r{i} ::= r{i + 1} r{i + 1}\n" for i in range(30)) + 'r30 ::= "a"'
    grammar = JsonGrammar.ebnf(doubling)  # 2^30 a's: its regex would not fit
    assert grammar.root.rules is not None and grammar.guide().allows(b"aaaa")


def balanced(text: str) -> bool:
    """NESTED's language, checked by hand: a bracketed, comma-separated list of x, "q\\n" (a backslash
    and an n, as the grammar's escapes write them) or lists."""
    def item(i):
        if text.startswith("x", i):
            return i + 1
        if text.startswith('"q\\n"', i):
            return i + 5
        return root(i)

    def root(i):
        if not text.startswith("[", i):
            return -1
        i += 1
        if text.startswith("]", i):
            return i + 1
        while True:
            i = item(i)
            if i < 0 or not text.startswith((",", "]"), i):
                return -1
            if text[i] == "]":
                return i + 1
            i += 1

    return root(0) == len(text)


@pytest.mark.parametrize("text", ["[]", "[x]", "[x,[x,[]]]", "[[[x]]]", '["q\\n",x]', "[x,]", "[x", "x", "[[x]]]"])
def test_rules_nest_and_recurse(text):
    grammar = JsonGrammar.ebnf(NESTED)
    assert accepts_whole(grammar, text) == balanced(text)
    guide = grammar.guide()
    if balanced(text):  # the outer list closed: nothing may follow
        guide.advance(text.encode())
        assert guide.done


@pytest.mark.parametrize("text, message", [
    ('root ::= root "x" | "y"', "rule 'root' is left-recursive (it may call itself before reading anything)"),
    ('root ::= a\na ::= b? root\nb ::= "z"', "is left-recursive"),  # through a rule that may match nothing
    ('root ::= undefined', "rule 'undefined' is used but not defined"),
    ('x ::= "a"', "no 'root' rule: output starts there"),
    ('root ::= "a"\nroot ::= "b"', "rule 'root' is defined twice"),
    ('root ::= ("a"', "rule 'root': missing ')' for the group"),
    ('root ::= "a', "rule 'root': the string at position 1 is not closed"),
    ('root ::= "a" @', "rule 'root': '@' at position 5 is not a literal, class, rule name or group"),
    ("hello", "expected rules of the form 'name ::= ...'"),
])
def test_a_grammar_it_cannot_follow_is_refused_by_name(text, message):
    with pytest.raises(SchemaError, match=re.escape(message)):
        JsonGrammar.ebnf(text)


@pytest.mark.parametrize("grammar, prefix", [(ANSWER, b""), (ANSWER, b"1"), (NESTED, b"[x,["), (NESTED, b'["q')])
def test_the_vocabulary_mask_allows_exactly_the_tokens_the_grammar_accepts(grammar, prefix):
    assert_the_mask_is_what_the_grammar_allows(JsonGrammar.ebnf(grammar), prefix)
    assert_the_mask_is_what_the_grammar_allows(stack_machine(grammar), prefix)


def test_a_random_model_guided_by_a_grammar_writes_what_it_matches():
    engine = Engine(random_model(), TOKENIZER, max_batch_size=4)
    answers = engine.generate(["a", "b"], [SamplingParams(max_tokens=20, temperature=1.0, seed=s,
                                                          grammar=JsonGrammar.ebnf(ANSWER)) for s in range(2)])
    assert all(re.fullmatch(ANSWER_RE, seq.text) for seq in answers), [s.text for s in answers]
    nested = engine.generate(["c", "d"], [SamplingParams(max_tokens=60, temperature=1.0, seed=s,
                                                         grammar=JsonGrammar.ebnf(NESTED)) for s in range(2)])
    for seq in nested:  # whole (finish "stop") or cut by max_tokens, a prefix either way
        assert balanced(seq.text) if seq.finish_reason == "stop" else JsonGrammar.ebnf(NESTED).guide().allows(
            seq.text.encode()), seq.text
