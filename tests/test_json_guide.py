"""Guided decoding (lm.json_guide): the grammar accepts exactly the JSON its schema allows, byte by
byte; unsupported schema keywords are refused by name; a model with random weights, whose own choices
are noise, still writes documents that parse and match the schema through the engine."""

import json
import random
import re
from fractions import Fraction

import pytest
import torch

from lm.config import ModelConfig, padded_vocab_size
from lm.engine import Engine, SamplingParams
from lm.json_guide import JsonGrammar, SchemaError
from lm.model import GPT
from lm.regex_guide import FORMATS
from lm.tokenizer import ByteBPETokenizer

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": -5, "maximum": 150},
                         "unit": {"enum": ["celsius", "fahrenheit"]}, "ok": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2}},
          "required": ["name", "age", "unit"]}


def accepts_whole(grammar: JsonGrammar, text: str) -> bool:
    guide = grammar.guide()
    if not guide.allows(text.encode()):
        return False
    guide.advance(text.encode())
    return guide.can_end


@pytest.mark.parametrize("text, ok", [
    ('{"name": "Ada", "age": 36, "unit": "celsius"}', True),
    ('{"name":"x","age":-4,"unit":"fahrenheit","ok":false,"tags":["a","bc"]}', True),
    ('{"name":"x","age":-4,"unit":"fahrenheit","tags":[]}', True),  # an optional property skipped
    ('{"unit":"fahrenheit","age":-4,"name":"x"}', False),  # the schema's order, as OpenAI writes it
    ('{"name":"x","age":-4,"unit":"celsius","tags":[],"ok":true}', False),
    ('{ "name": "\\u00e9\\n", "age": 0, "unit": "celsius" }', True),
    ('{\n  "name": "A",\n  "age": 0,\n  "unit": "celsius"\n}', False),  # compact: one space at most
    ('{"name":  "A", "age": 0, "unit": "celsius"}', False),
    ('{"name": "Ada", "age": 36}', False),  # a required property missing
    ('{"name": "Ada", "age": 3.5, "unit": "celsius"}', False),  # integer
    ('{"name": "Ada", "age": 01, "unit": "celsius"}', False),  # leading zero
    ('{"name": "Adalbert", "age": 1, "unit": "celsius"}', False),  # maxLength
    ('{"name": "A", "age": 1, "unit": "kelvin"}', False),  # enum
    ('{"name": "A", "age": 150, "unit": "celsius"}', True),  # the bounds are inclusive
    ('{"name": "A", "age": 151, "unit": "celsius"}', False),  # maximum
    ('{"name": "A", "age": -6, "unit": "celsius"}', False),  # minimum
    ('{"name": "A", "age": 1500, "unit": "celsius"}', False),
    ('{"name": "A", "age": 1, "unit": "celsius", "x": 1}', False),  # undeclared property
    ('{"name": "A", "name": "B", "age": 1, "unit": "celsius"}', False),  # a property twice
    ('{"name": "A", "age": 1, "unit": "celsius", "tags": ["a", "b", "c"]}', False),  # maxItems
    ('{"name": "a\nb", "age": 1, "unit": "celsius"}', False),  # a raw control character in a string
])
def test_the_grammar_accepts_exactly_what_the_schema_allows(text, ok):
    assert accepts_whole(JsonGrammar(PERSON), text) is ok


@pytest.mark.parametrize("schema, good, bad", [
    ({"type": "number", "minimum": 0, "maximum": 1}, ["0", "1", "0.25", "1.0", "0.999"], ["1.01", "-0.1", "2", "1e-3", "01"]),
    ({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.5}, ["0.1", "0.4999"], ["0", "0.0", "0.5", "-1"]),
    ({"type": "number", "minimum": -2.5, "maximum": 30}, ["-2.5", "-2", "29.9", "30", "7"], ["-2.51", "30.01", "31", "-3"]),
    ({"type": ["integer", "number"], "maximum": -0.5}, ["-1", "-0.5", "-12.75"], ["0", "-0.4", "-0"]),
    ({"type": "integer", "exclusiveMinimum": 1.5, "maximum": 20}, ["2", "20", "15"], ["1", "2.0", "21", "200"]),
])
def test_bounded_numbers_are_written_within_their_bounds(schema, good, bad):
    """Decimal bounds, inclusive and exclusive, exact (0.1 is the decimal 0.1); written without an exponent."""
    grammar = JsonGrammar({"type": "array", "items": schema})
    assert all(accepts_whole(grammar, f"[{text}]") for text in good), good
    assert not any(accepts_whole(grammar, f"[{text}]") for text in bad), bad


def test_random_walks_under_random_bounds_never_stick_and_end_within_them():
    rng = random.Random(1)
    for _ in range(150):
        kind, ends = rng.choice(["integer", "number"]), sorted(round(rng.uniform(-50, 50), rng.choice([0, 1, 2])) for _ in "ab")
        schema = {"type": kind, rng.choice(["minimum", "exclusiveMinimum"]): ends[0]}
        if rng.random() < 0.7:
            schema[rng.choice(["maximum", "exclusiveMaximum"])] = ends[1]
        try:
            grammar = JsonGrammar({"type": "array", "items": schema, "minItems": 1, "maxItems": 1})
        except SchemaError:  # bounds that leave nothing between
            continue
        guide, text = grammar.guide(), b"["
        guide.advance(text)
        while not guide.done:
            options = [c for c in b"-0123456789.]" if guide.allows(bytes([c]))]
            assert options, (schema, text)
            text += bytes([rng.choice(options)])
            guide.advance(text[-1:])
        value = Fraction(text[1:-1].decode())
        assert kind == "number" or value.denominator == 1 and b"." not in text, (schema, text)
        low, high = Fraction(repr(ends[0])), Fraction(repr(ends[1]))
        assert value > low if "exclusiveMinimum" in schema else value >= low, (schema, text)
        assert "maximum" not in schema or value <= high, (schema, text)
        assert "exclusiveMaximum" not in schema or value < high, (schema, text)


def test_random_walks_in_patterns_with_length_bounds_never_stick_and_end_within_them():
    """A character that leaves the pattern no whole match within minLength..maxLength is refused, so a
    string never dead-ends (a free `[A-Z]+` cut off by maxLength before the `-\\d+` it still needs)."""
    rng = random.Random(2)
    patterns = [r"^[A-Z]+-\d+$", r"^(x|yzz|é{2,})$", r"^(ab)+c?$", "email"]
    for _ in range(120):
        pattern, low = rng.choice(patterns), rng.randint(0, 6)
        schema = {"type": "string", "minLength": low, "maxLength": low + rng.randint(0, 8)}
        schema.update({"format": "email"} if pattern == "email" else {"pattern": pattern})
        try:
            grammar = JsonGrammar(schema)
        except SchemaError as error:  # bounds no match fits
            assert "characters (minLength, maxLength) matches it" in str(error)
            continue
        guide, text = grammar.guide(), b'"'
        guide.advance(text)
        while not guide.done:
            options = [c for c in ['"', "A", "Z", "-", "1", "x", "y", "z", "a", "b", "c", "é", "@", "."]
                       if guide.allows(c.encode())]
            assert options, (schema, text)
            chosen = rng.choice(options).encode()
            guide.advance(chosen)
            text += chosen
        value = json.loads(text)
        assert schema["minLength"] <= len(value) <= schema["maxLength"], (schema, value)
        assert re.fullmatch(FORMATS["email"] if pattern == "email" else pattern.strip("^$"), value), (schema, value)
    with pytest.raises(SchemaError, match=r"^pattern: no string of at most 3 characters \(minLength, maxLength\) "):
        JsonGrammar({"type": "string", "pattern": "^a{5}$", "maxLength": 3})


def test_json_object_mode_takes_any_object_and_numbers_end_only_where_they_may():
    any_object = JsonGrammar(None)
    assert accepts_whole(any_object, '{"a": [1, -2.5E-3, {"b": null}], "c": true, "d": "x"}')
    assert not accepts_whole(any_object, '[1, 2]') and not accepts_whole(any_object, '{"a": 1,}')
    number = JsonGrammar({"type": "number"}).guide()
    number.advance(b"12")
    assert number.can_end and not number.done  # "12" may end, or go on to "123"
    closed = JsonGrammar({"type": "boolean"}).guide()
    closed.advance(b"true")
    assert closed.done


CODED = {"type": "object", "properties": {
    "code": {"type": "string", "pattern": r"^[A-Z]{2}-\d{2,3}$"}, "quote": {"type": "string", "pattern": r'a"b\\c\n', "maxLength": 6},
    "note": {"type": "string", "pattern": r"[^x]+", "minLength": 3, "maxLength": 4},
    "day": {"type": "string", "format": "date"}, "host": {"type": "string", "format": "hostname"},
    "score": {"type": "number", "minimum": 0, "exclusiveMaximum": 1}}, "required": ["code"]}


@pytest.mark.parametrize("text, ok", [
    ('{"code": "AB-12"}', True), ('{"code": "AB-1234"}', False), ('{"code": "ab-12"}', False),
    ('{"code": "AB-12", "quote": "a\\"b\\\\c\\n"}', True),  # the pattern reads the string's characters, after escapes
    ('{"code": "AB-12", "quote": "a\\"b\\\\c\\u000a"}', False),  # a \uXXXX escape is not written
    ('{"code": "AB-12", "note": "ééé"}', True), ('{"code": "AB-12", "note": "éé"}', False),  # minLength in characters
    ('{"code": "AB-12", "note": "abcde"}', False), ('{"code": "AB-12", "note": "axe"}', False),
    ('{"code": "AB-12", "day": "2024-02-29"}', True), ('{"code": "AB-12", "day": "2024-2-29"}', False),
    ('{"code": "AB-12", "host": "not checked: an annotation"}', True),  # a format not enforced
])
def test_a_strings_pattern_and_format_are_enforced(text, ok):
    assert accepts_whole(JsonGrammar(CODED), text) is ok


def test_a_regex_grammar_writes_raw_text_and_ends_where_nothing_may_follow():
    grammar = JsonGrammar.regex(r"(yes|no)!?")
    guide = grammar.guide()
    guide.advance(b"no")
    assert guide.can_end and not guide.done and not guide.allows(b"?")
    guide.advance(b"!")
    assert guide.done
    assert JsonGrammar.choice([" yes", "no"]).guide().allows(b" y")  # a choice may begin with a space


def test_local_references_and_recursion():
    tree = {"$defs": {"Node": {"type": "object", "required": ["v"],
                               "properties": {"v": {"type": "integer"},
                                              "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}}},
            "$ref": "#/$defs/Node"}
    assert accepts_whole(JsonGrammar(tree), '{"v": 1, "kids": [{"v": 2, "kids": []}, {"v": 3}]}')
    assert not accepts_whole(JsonGrammar(tree), '{"v": 1, "kids": [{"kids": []}]}')


@pytest.mark.parametrize("schema, message", [
    ({"type": "string", "pattern": "(?=a)a"}, "pattern: '(?=' at position 0: lookaround"),
    ({"properties": {"age": {"type": "string", "minimum": 0}}},
     "properties.age.minimum: bounds a number: the type must include number or integer"),
    ({"type": "number", "minimum": 1, "exclusiveMaximum": 1}, "exclusiveMaximum: leaves no number between"),
    ({"type": "number", "maximum": "1"}, "maximum: must be a finite number"),
    ({"type": "integer", "minimum": 3, "exclusiveMaximum": 3}, "exclusiveMaximum: leaves no integer between"),
    ({"type": "integer", "multipleOf": 2}, "multipleOf: is not supported"),
    ({"type": "strng"}, "type: must be one of object, array, string"),
    ({"properties": {"a": {}}, "required": ["b"]}, "required: must list names from 'properties'"),
    ({"$ref": "#/$defs/Missing"}, "$ref: '#/$defs/Missing' does not resolve"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "maxItems: must be >= minItems"),
])
def test_a_schema_it_cannot_enforce_is_refused_by_name(schema, message):
    with pytest.raises(SchemaError, match=re.escape(message)):
        JsonGrammar(schema)


TEXTS = ['{"name": "Ada", "age": 36, "unit": "celsius", "tags": ["x", "yz"]}\n',
         'def main():\n    return {"ok": true, "n": -1.5e3}\n', "héllo wörld, plain prose as well.\n"]
TOKENIZER = ByteBPETokenizer.train(TEXTS * 30, 400)


def random_model() -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(name="t", n_layer=2, n_head=2, n_embd=32, block_size=256,
                      vocab_size=padded_vocab_size(TOKENIZER.vocab_size))
    return GPT(cfg).eval()


def test_token_bytes_spell_what_each_token_decodes_to():
    table = TOKENIZER.token_bytes()
    assert len(table) == TOKENIZER.vocab_size and table[TOKENIZER.eot_id] is None  # special: never guided
    for i, data in enumerate(table):
        text = TOKENIZER.decode([i])
        if data is not None and "\ufffd" not in text:
            assert data == text.encode(), i


ROOMY = {"type": "object", "properties": {"name": {"type": "string", "minLength": 30, "maxLength": 40}}}
PREFIXES = [b"", b'{"name": "', b'{"name": "x\\', b'{"name": "\xc3', b'{"name": "a", "age": 1', b'{"tags": ["',
            b'{"code": "AB-1', b'{"quote": "a\\', b'{"note": "\xc3\xa9', b'{"code": "AB-12", "score": 0.9']


@pytest.mark.parametrize("schema, prefix", [(schema, prefix) for schema in (None, PERSON, ROOMY, CODED) for prefix in PREFIXES
                                            if JsonGrammar(schema).guide().allows(prefix) or not prefix])
def test_the_vocabulary_mask_allows_exactly_the_tokens_the_grammar_accepts(schema, prefix):
    """Free strings (None), length-bounded ones with and without room for a plain token, escapes,
    half a UTF-8 character, numbers, keys, lists, strings under a pattern."""
    assert_the_mask_is_what_the_grammar_allows(JsonGrammar(schema), prefix)


@pytest.mark.parametrize("pattern, prefix", [(r"[a-z ]{0,30}\.", b"de"), (r"(\d+|many) (cats|dogs)!?", b"12 cat"),
                                             (r"(yes|no)!?", b"n"), (r"\w+\s\w+", b"")])
def test_a_regex_grammars_mask_allows_exactly_the_tokens_it_accepts(pattern, prefix):
    """Read by the regex's DFA alone, and by the whole machine past a match that nothing may extend."""
    assert_the_mask_is_what_the_grammar_allows(JsonGrammar.regex(pattern), prefix)


def assert_the_mask_is_what_the_grammar_allows(grammar: JsonGrammar, prefix: bytes) -> None:
    table = TOKENIZER.token_bytes()
    guide = grammar.guide()
    guide.advance(prefix)
    expected = [data is not None and guide.allows(data) for data in table]
    assert guide.mask(table).tolist() == expected and any(expected)
    assert guide.mask(table).tolist() == expected  # cached


def check_person(value: dict) -> None:
    assert set(value) <= set(PERSON["properties"]) and {"name", "age", "unit"} <= set(value)
    assert isinstance(value["name"], str) and len(value["name"]) <= 6
    assert isinstance(value["age"], int) and -5 <= value["age"] <= 150 and value["unit"] in ("celsius", "fahrenheit")
    assert isinstance(value.get("ok", True), bool)
    assert all(isinstance(t, str) and len(t) <= 3 for t in value.get("tags", [])) and len(value.get("tags", [])) <= 2


def test_a_random_model_guided_by_a_schema_writes_documents_that_match_it():
    """Random weights choose noise; every sampled and greedy document still parses and matches, and
    ends as soon as it is complete (finish_reason "stop")."""
    engine = Engine(random_model(), TOKENIZER, max_batch_size=4)
    grammar = JsonGrammar(PERSON)
    params = [SamplingParams(max_tokens=200, temperature=t, seed=s, grammar=grammar)
              for t, s in ((1.0, 0), (1.0, 1), (0.7, 2), (0.0, None))]
    seqs = engine.generate(["The person: ", "x", "{", "age"], params)
    for seq in seqs:
        assert seq.finish_reason == "stop", seq.text
        check_person(json.loads(seq.text))
    again = engine.generate(["The person: "], params[0])[0]
    assert again.text == seqs[0].text  # the same seed, the same guided sample


def test_a_random_model_guided_by_patterns_bounds_and_a_regex_writes_what_they_match():
    engine = Engine(random_model(), TOKENIZER, max_batch_size=4)
    schema = {"type": "object", "required": ["code", "day", "note", "score"], "properties": {
        name: CODED["properties"][name] for name in ("code", "day", "note", "score")}}
    documents = engine.generate(["x", "{"], [SamplingParams(max_tokens=200, temperature=1.0, seed=s,
                                                            grammar=JsonGrammar(schema)) for s in range(2)])
    for seq in documents:
        value = json.loads(seq.text)
        assert re.fullmatch(r"[A-Z]{2}-\d{2,3}", value["code"]) and re.fullmatch(r"\d{4}-\d\d-\d\d", value["day"])
        assert 3 <= len(value["note"]) <= 4 and "x" not in value["note"] and 0 <= value["score"] < 1
    pattern = r"(\d{1,3}|many) (cats|dogs)\.?"
    texts = engine.generate(["a", "b", "c"], [SamplingParams(max_tokens=30, temperature=1.0, seed=s,
                                                             grammar=JsonGrammar.regex(pattern)) for s in range(3)])
    assert all(re.fullmatch(pattern, seq.text) and seq.finish_reason == "stop" for seq in texts), [s.text for s in texts]


def test_guided_and_free_sequences_share_a_batch():
    engine = Engine(random_model(), TOKENIZER, max_batch_size=4)
    free, guided = engine.generate(["x", "x"], [SamplingParams(max_tokens=20, temperature=1.0, seed=3),
                                                SamplingParams(max_tokens=200, temperature=1.0, seed=3,
                                                               grammar=JsonGrammar(PERSON))])
    alone = Engine(random_model(), TOKENIZER, max_batch_size=1).generate(
        ["x"], SamplingParams(max_tokens=20, temperature=1.0, seed=3))[0]
    assert free.output_ids == alone.output_ids  # the guided row changes nothing for its neighbour
    check_person(json.loads(guided.text))


def test_a_choice_grammar_writes_one_of_its_strings_as_written():
    engine = Engine(random_model(), TOKENIZER, max_batch_size=4)
    options = ["yes", "no", "yes, but"]
    seqs = engine.generate(["Is it? ", "x", "y", "z"], [SamplingParams(max_tokens=20, temperature=1.0, seed=s,
                                                                       grammar=JsonGrammar.choice(options))
                                                        for s in range(4)])
    assert all(seq.text in options for seq in seqs), [seq.text for seq in seqs]
    assert not JsonGrammar.choice(options).guide().allows(b" ") and not JsonGrammar(None).guide().allows(b" {")


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "xml"}}, "response_format", "{type: json_object}"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "(a)\\1"}}}},
     "response_format", "response_format.json_schema.schema.pattern: '\\1' at position 3 is not supported"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs",
     "'structured_outputs.structural_tag' is not supported"),
    ({"structured_outputs": {"grammar": 'root ::= root "x" | "y"'}}, "structured_outputs",
     "structured_outputs.grammar: rule 'root' is left-recursive"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs", "structured_outputs.regex: missing ']' for the class"),
    ({"structured_outputs": {"regex": 7}}, "structured_outputs", "'structured_outputs.regex' must be a string"),
    ({"structured_outputs": {"json": {"type": "object"}, "choice": ["a"]}}, "structured_outputs", "one of json"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "non-empty list"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"json_object": True}}, "structured_outputs",
     "send one of"),
])
def test_guided_requests_a_server_cannot_honour_are_400s_naming_the_field(body, param, message):
    from launcher.openai_protocol import APIError, guided_decoding

    with pytest.raises(APIError) as refused:
        guided_decoding(body, None)
    assert refused.value.status == 400 and refused.value.param == param and message in refused.value.message


def test_the_request_forms_give_their_grammars():
    from launcher.openai_protocol import guided_decoding

    assert guided_decoding({"response_format": {"type": "text"}}, None) == (None, None)
    for body, text in [({"response_format": {"type": "json_object"}}, b'{"a": 1}'),
                       ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
                           "type": "integer"}}}}, b"-12"),
                       ({"structured_outputs": {"json": '{"type": "boolean"}'}}, b"false"),
                       ({"structured_outputs": {"choice": ["red", "green"]}}, b"green"),
                       ({"structured_outputs": {"regex": r"\d+ (apples|pears)"}}, b"12 pears"),
                       ({"structured_outputs": {"grammar": 'root ::= "a" [0-9]+'}}, b"a12")]:
        grammar, forced = guided_decoding(body, None)
        guide = grammar.guide()
        assert forced is None and guide.allows(text) and (guide.advance(text) or guide.can_end), body
