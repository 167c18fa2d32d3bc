"""Regexes as byte automata (lm.regex_guide): they match exactly what Python's `re` matches whole, on
the syntax both share; every character class spells exactly the valid UTF-8 of its characters; what
cannot be compiled faithfully is refused by name."""

import random
import re
import uuid

import pytest

from lm.regex_guide import FORMATS, Regex, RegexError

PATTERNS = [r"a*b", r"(a|b)*c", r"\d{3}-\d{4}", r"[a-z]+@[a-z]+\.com", r"(ab)+", r"a{2,3}", r"a{2,}", r"x*(y|z)",
            r"(a*|c)d", r".+", r"[^a-c]*", r"héllo|wörld", r"[\d\-]+", r"(?:ab|cd)?e", r"(?P<n>a)b", r"[]a]+",
            r"a{0}b", r"\S+", r"[^\x00-\x7f]+", r"(a|)b", r"()*a", r"colou?r", r"[A-Fa-f0-9]{2}", r"\.\*\+",
            r"(a+|b+)*c", r"[\u00e9\u4e2d]+x?", r"a+?b*?", r"[a-e&]{1,2}", r"\x7b\d\}", r"[^\s]+\s[^\s]+"]
ALPHABET = ["a", "b", "c", "d", "e", "x", "y", "z", "1", "-", " ", "é", "ö", "@", ".", "]", "h", "l", "o", "\n",
            "中", "😀", "{", ",", "}", "*", "+", "&"]


# Matches that random texts would rarely hit.
EXAMPLES = {r"[a-z]+@[a-z]+\.com": ["ab@cd.com"], r"\d{3}-\d{4}": ["555-0123"], r"héllo|wörld": ["héllo", "wörld"],
            r"\x7b\d\}": ["{7}"], r"colou?r": ["color", "colour"], r"[\u00e9\u4e2d]+x?": ["é中x"],
            r"(ab)+": ["abab"], r"a{2,3}": ["aa", "aaa", "aaaa"], r"a{2,}": ["aaaaaaaaa"], r"\.\*\+": [".*+", ".*"]}


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_pattern_matches_exactly_what_python_matches_whole(pattern):
    rng = random.Random(pattern)
    regex, python = Regex(pattern), re.compile(pattern)
    texts = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 7))) for _ in range(3000)]
    texts += EXAMPLES.get(pattern, [])
    for text in texts:
        assert regex.fullmatch(text.encode()) == bool(python.fullmatch(text)), (pattern, text)
    assert any(python.fullmatch(text) for text in texts) and not all(python.fullmatch(text) for text in texts)
    anchored = Regex(f"^{pattern}$")
    assert all(anchored.fullmatch(t.encode()) == regex.fullmatch(t.encode()) for t in texts[:300])


def test_classes_spell_exactly_the_utf8_of_their_characters():
    anything = Regex(r"[^\n\r\u2028\u2029]")  # the whole of Unicode but four characters
    for code in (*range(0, 0x3000), *range(0xD7F0, 0xE010), *range(0xFFF0, 0x10100), *range(0x10FF00, 0x110000)):
        if not 0xD800 <= code <= 0xDFFF:
            assert anything.fullmatch(chr(code).encode()) == (chr(code) not in "\n\r\u2028\u2029"), hex(code)
    for invalid in (b"\x80", b"\xc0\x80", b"\xc3", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80"):
        assert not anything.fullmatch(invalid), invalid  # overlong, lone, surrogate, past U+10FFFF
    word = Regex(r"\w+")  # ASCII, as ECMAScript's without the u flag
    assert word.fullmatch(b"snake_case9") and not word.fullmatch("é".encode())


def test_a_step_is_refused_where_no_match_can_follow_and_ends_where_nothing_may_extend():
    regex = Regex(r"(yes|no)!?")
    state = regex.start
    for byte in b"no":
        state = regex.step(state, byte)
    assert regex.accepts(state) and not regex.ends(state) and regex.step(state, ord("?")) == -1
    assert regex.ends(regex.step(state, ord("!")))


@pytest.mark.parametrize("name, good, bad", [
    ("date", ["2024-02-29", "1999-12-31"], ["2024-13-01", "2024-1-01", "24-01-01"]),
    ("time", ["23:59:60Z", "08:00:00.5+05:30"], ["24:00:00Z", "08:00:00"]),
    ("date-time", ["2024-02-29T12:30:00Z"], ["2024-02-29 12:30:00Z", "2024-02-29T12:30Z"]),
    ("uuid", [str(uuid.UUID(int=12345)), "123E4567-E89B-12D3-A456-426614174000"], ["123e4567e89b12d3a456426614174000"]),
    ("ipv4", ["192.168.0.255", "0.0.0.0"], ["256.1.1.1", "1.2.3", "01.2.3.4"]),
    ("email", ["ada.lovelace+x@example.org"], ["ada@localhost", ".ada@example.org", "ada@-x.org"]),
])
def test_formats(name, good, bad):
    regex = Regex(FORMATS[name])
    assert all(regex.fullmatch(t.encode()) for t in good) and not any(regex.fullmatch(t.encode()) for t in bad)


@pytest.mark.parametrize("pattern, message", [
    (r"(?=a)b", "'(?=' at position 0: lookaround, inline flags and other extensions are not supported"),
    (r"(?i)a", "'(?i' at position 0: lookaround"),
    (r"(a)\1", r"'\1' at position 3 is not supported (backreferences"),
    (r"a\b", r"'\b' at position 1 is not supported"),
    (r"\p{L}", r"'\p' at position 0 is not supported"),
    (r"a^b", "'^' at position 1: anchors are implied at the pattern's ends and not supported inside it"),
    (r"a$|b", "'$' at position 1: anchors"),
    (r"a**", "'*' at position 2 has nothing to repeat"),
    (r"a++", "possessive repeat at position 2 is not supported"),
    (r"a{3,1}", "'{3,1}' at position 1: the maximum is below the minimum"),
    (r"a{,3}", "'{,3}' at position 1: write the least count too ({0,3})"),
    (r"(ab", "missing ')' for the group at position 0"),
    (r"ab)", "unbalanced ')' at position 2"),
    (r"[ab", "missing ']' for the class at position 0"),
    (r"[z-a]", "the class range at position 0 runs backwards"),
    (r"[\d-z]", "a class range at position 0 must run between two characters"),
    (r"\x4", r"'\x' at position 0 needs 2 hex digits"),
    ("a\\", "the pattern ends in a lone backslash"),
    (r"(a{100}){300}", "the pattern is too large"),
])
def test_what_cannot_be_compiled_faithfully_is_refused_by_name(pattern, message):
    with pytest.raises(RegexError, match=re.escape(message)):
        Regex(pattern)
