"""Tool calling through /v1/chat/completions, as vLLM serves an instruct model: OpenAI's `tools` are
written into the prompt by the model's own template (as transformers' `apply_chat_template(tools=...)`
writes them), the turns of earlier calls render, and the calls in the reply come back as `tool_calls`
(streamed and not) in the format the template taught the model (Qwen's `<tool_call>`, Mistral's
`[TOOL_CALLS]`, Llama's JSON). Over HTTP, a model built to answer with one fixed call stands in for a
tuned one, so the whole path is checked with the openai client."""

import json

import pytest
import torch

from conftest import served
from launcher.openai_protocol import (APIError, ToolCallStream, chat_prompt, chat_tools, completion_response,
                                      tokenize_text)
from lm.chat_template import BUILTIN, ChatTemplate, hf_chat_template
from lm.tokenizer import ByteBPETokenizer
from lm.tool_calls import parse_tool_calls

# Qwen2.5-Instruct's template (tools, tool calls, tool results), as its tokenizer_config.json has it.
QWEN_TOOLS = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.' }}{%- endif %}{{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user "
    "query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}"
    "{%- for tool in tools %}{{- \"\\n\" }}{{- tool | tojson }}{%- endfor %}"
    "{{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == \"assistant\" %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == \"tool\" %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Today's weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
# A finished exchange: the call (arguments as OpenAI sends them, a JSON string), its result, the answer.
HISTORY = QUESTION + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    {"role": "user", "content": "And tomorrow?"}]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A Hugging Face directory with Qwen's template and tool markers, and a GPT-2 built to answer every
    prompt with one call: each token's logits favour one next token (one-hot embeddings, blocks that add
    nothing, a head that maps token to token), chained from the generation prompt's last token through
    `<tool_call>`, the call's JSON (one added token) and `</tool_call>` to `<|im_end|>`."""
    import transformers

    directory = tmp_path_factory.mktemp("qwen-tools") / "qwen-tools"
    directory.mkdir()
    bpe = ByteBPETokenizer.train(iter(["What is the weather in Paris today? Sunny. " * 20]), vocab_size=300)
    bpe._tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    bpe._tok.add_tokens(["<tool_call>", "</tool_call>", "\n" + CALL + "\n"])
    bpe.save(directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": QWEN_TOOLS, "eos_token": "<|im_end|>"}))
    ids = bpe._tok.token_to_id
    vocab = bpe._tok.get_vocab_size()
    prompt = ChatTemplate(QWEN_TOOLS).render(QUESTION, tools=[WEATHER])
    chain = [bpe.encode(prompt, add_special_tokens=False)[-1], ids("<tool_call>"), ids("\n" + CALL + "\n"),
             ids("</tool_call>"), ids("<|im_end|>")]
    width = vocab + 4 - vocab % 4
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=width, n_layer=1, n_head=4,
                                     tie_word_embeddings=False, eos_token_id=ids("<|im_end|>"))
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "c_proj" in name or "wpe" in name:
                tensor.zero_()
        model.transformer.wte.weight.copy_(10 * torch.eye(vocab, width))
        head = torch.zeros(vocab, width)
        head[ids("<|im_end|>"), :vocab] = 10  # by default a reply ends
        head[ids("]"), :vocab] = 5  # and, where guided decoding refuses that, a list closes (one forced call)
        for token, following in zip(chain, chain[1:]):
            head[:, token] = 0
            head[following, token] = 10
        model.lm_head.weight.copy_(head)
    model.save_pretrained(directory)
    return directory


def test_tools_and_tool_turns_render_as_transformers_renders_them(qwen_dir):
    from transformers import AutoTokenizer

    template = hf_chat_template(qwen_dir)
    assert template.takes_tools and template.tool_format == "hermes"
    assert not BUILTIN.takes_tools and ChatTemplate(QWEN_TOOLS.replace("tools", "extras")).tool_format is None
    reference = AutoTokenizer.from_pretrained(qwen_dir)
    # transformers takes the call's arguments as an object; the server parses OpenAI's JSON string
    parsed = [dict(m, tool_calls=[{**c, "function": {**c["function"], "arguments": {"city": "Paris"}}}
                                  for c in m["tool_calls"]]) if m.get("tool_calls") else m for m in HISTORY]
    body = {"messages": HISTORY, "tools": [WEATHER]}
    assert chat_prompt(body, template, tools=chat_tools(body, template)) == reference.apply_chat_template(
        parsed, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in \
        chat_prompt(body, template)
    # vLLM's /tokenize renders the tools too
    assert tokenize_text(body, template) == (chat_prompt(body, template, tools=[WEATHER]), False)
    assert chat_prompt({"messages": QUESTION}, template) == reference.apply_chat_template(
        QUESTION, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("form,text,content,calls", [
    ("hermes", "Let me look.\n<tool_call>\n" + CALL + "\n</tool_call>\n<tool_call>\n{\"name\": \"now\", "
     "\"arguments\": {}}\n</tool_call>", "Let me look.\n", [("get_weather", {"city": "Paris"}), ("now", {})]),
    ("hermes", "<tool_call>\n" + CALL, None, [("get_weather", {"city": "Paris"})]),  # cut off before its end tag
    ("hermes", "No tools needed.", "No tools needed.", []),
    ("hermes", "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": </tool_call>",  # not JSON: text
     "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": </tool_call>", []),
    ("mistral", "[TOOL_CALLS][" + CALL + "]", None, [("get_weather", {"city": "Paris"})]),
    ("json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
     [("get_weather", {"city": "Paris"})]),
    ("json", '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}', None,
     [("a", {}), ("b", {"x": 1})]),
    ("json", "It is sunny.", "It is sunny.", []),
])
def test_tool_calls_are_read_from_replies(form, text, content, calls):
    found_content, found = parse_tool_calls(text, form)
    assert found_content == content
    assert [(call.name, json.loads(call.arguments)) for call in found] == calls


def streamed(form: str, reply: str, parallel: bool = True, piece: int = 3) -> tuple[str, dict, bool]:
    """A reply fed to a ToolCallStream `piece` characters at a time, as a client accumulates what it sends:
    (the text, each call's {"id", "name", "arguments"} by index, whether the reply made calls)."""
    stream, text, calls = ToolCallStream(form, parallel), "", {}

    def accumulate(deltas):
        for delta in deltas:
            call = calls.setdefault(delta["index"], {"id": None, "name": None, "arguments": ""})
            assert ("id" in delta) == (call["id"] is None)  # the first delta of a call, and only it, names it
            call["id"] = call["id"] or delta["id"]
            call["name"] = delta["function"].get("name", call["name"])
            call["arguments"] += delta["function"]["arguments"]

    for i in range(0, len(reply), piece):
        out, deltas = stream.feed(reply[i:i + piece])
        text += out
        accumulate(deltas)
    rest, deltas, called = stream.finish()
    accumulate(deltas)
    return text + rest, calls, called


def test_a_stream_sends_text_and_holds_back_where_a_call_begins():
    reply = "Checking <tool not a call> now.\n<tool_call>\n" + CALL + "\n</tool_call>"
    text, calls, called = streamed("hermes", reply)
    assert text == "Checking <tool not a call> now.\n" and called
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "Paris"})]
    plain = ToolCallStream("json")
    assert plain.feed("{") == ("", []) and plain.feed("oops, JSON-ish text") == ("", [])  # held: it may be a call
    assert plain.finish() == ("{oops, JSON-ish text", [], False)
    # The start of a tag that turns out to be text: nothing of it, or after it, is read as a call.
    text, calls, called = streamed("json", '<|pyramid|> is not a tag: {"name": "x", "parameters": {}}')
    assert text == '<|pyramid|> is not a tag: {"name": "x", "parameters": {}}' and not calls and not called


@pytest.mark.parametrize("form,reply", [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "search", "arguments": {"query": "caf\\u00e9 \\"open\\"",'
     ' "limit":  10, "near": [48.85,2.35], "open": true, "filters": {}}}\n</tool_call>\n<tool_call>\n'
     '{"arguments": {"text": "a\\nb \\ud83d\\ude00"}, "name": "echo"}\n</tool_call>'),
    ("mistral", '[TOOL_CALLS][{"name": "search", "arguments": {"query": "x", "limit": 1e1}, "id": 7 }, {"name": '
     '"now", "arguments": {}}]'),
    ("json", '<|python_tag|>{"name": "search", "parameters": {"query": "x"}}; {"name": "now", "parameters": {}}'),
    ("required", '[{"name": "search", "parameters": {"query": "x", "limit": -0.50}}]'),
    ("hermes", '<tool_call>\n{"name": "search", "arguments": "{\\"query\\": \\"x\\"}"}\n</tool_call>'),
])
def test_streamed_calls_add_up_to_what_the_whole_reply_returns(form, reply):
    """A call's id and name go out once its name is whole, its arguments while the model writes them,
    rewritten as the whole reply's parse writes them; whatever the pieces' sizes."""
    _, expected = parse_tool_calls(reply, form)
    for piece in (1, 2, 7, len(reply)):
        text, calls, called = streamed(form, reply, piece=piece)
        assert called and text == ("Sure.\n" if reply.startswith("Sure") else "")
        assert [(c["name"], c["arguments"]) for c in calls.values()] == [(c.name, c.arguments) for c in expected]
    whole = ToolCallStream(form)
    whole.feed(reply)
    assert len(whole.streamed) == len(expected)  # every call streamed before the reply's end, not after it
    stream = ToolCallStream("hermes")
    _, first = stream.feed('<tool_call>\n{"name": "search", "arguments": {"query": "caf')
    assert first == [{"index": 0, "id": first[0]["id"], "type": "function",
                      "function": {"name": "search", "arguments": '{"query": "caf'}}]  # before the call ends
    assert stream.feed('e"}}')[1] == [{"index": 0, "function": {"arguments": 'e"}'}}]


def test_a_call_that_began_streaming_stays_a_call_if_the_reply_breaks_off():
    """As OpenAI and vLLM stream it: a reply cut off inside its arguments (max_tokens) has sent its call;
    it is not sent again as text."""
    text, calls, called = streamed("hermes", '<tool_call>\n{"name": "search", "arguments": {"query": "ca')
    assert text == "" and not called and calls[0]["name"] == "search" and calls[0]["arguments"] == '{"query": "ca'
    text, calls, called = streamed("hermes", '<tool_call>\n{"nam')  # no name yet: nothing sent, the text is
    assert text == '<tool_call>\n{"nam' and not calls and not called


def test_tool_requests_a_server_cannot_honour_are_400s(qwen_dir):
    template = hf_chat_template(qwen_dir)
    cases = [({"tools": [WEATHER]}, BUILTIN, "tools", "does not take tools"),
             ({"tools": [{"type": "function"}]}, template, "tools", "must be a list of"),
             ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, template,
              "tool_choice", "naming one of the tools (get_weather)"),
             ({"tools": [WEATHER], "tool_choice": "always"}, template, "tool_choice", "'required'"),
             ({"tool_choice": "auto"}, template, None, None)]
    for extra, chosen, param, message in cases:
        body = {"messages": QUESTION, **extra}
        if param is None:
            assert chat_tools(body, chosen) is None
            continue
        with pytest.raises(APIError) as refused:
            chat_tools(body, chosen)
        assert refused.value.status == 400 and refused.value.param == param and message in refused.value.message
    assert chat_tools({"messages": QUESTION, "tools": [WEATHER], "tool_choice": "none"}, template) is None
    with pytest.raises(APIError) as refused:  # a tool result for a model that has no tool role
        chat_prompt({"messages": HISTORY}, BUILTIN)
    assert refused.value.param == "messages" and "messages[1]" in refused.value.message


def test_a_forced_call_is_guided_to_the_tools_schemas():
    """tool_choice "required": one or more calls of the offered tools; a named function: exactly one
    call of it, with arguments that match its parameters (as vLLM guides them)."""
    from launcher.openai_protocol import forced_tool_call

    other = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
    body = {"messages": QUESTION, "tools": [WEATHER, other]}
    assert forced_tool_call(dict(body, tool_choice="auto"), [WEATHER, other]) is None
    required, form = forced_tool_call(dict(body, tool_choice="required"), [WEATHER, other])
    two_calls = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {"zone": "UTC"}}]'
    for text, ok in ((two_calls, True), ('[]', False), ('[{"name": "get_time", "parameters": {"zone": "PST"}}]', False),
                     ('[{"name": "get_weather", "parameters": {}}]', False)):
        guide = required.guide()
        assert (guide.allows(text.encode()) and (guide.advance(text.encode()) or guide.done)) is ok, text
    assert form == "required" and [c.name for c in parse_tool_calls(two_calls, form)[1]] == ["get_weather", "get_time"]
    named, form = forced_tool_call(dict(body, tool_choice={"type": "function", "function": {"name": "get_time"}}),
                                   [WEATHER, other])
    assert form == "named" and not named.guide().allows(b'[{"name": "get_weather"')
    guide = named.guide()
    assert guide.allows(b'[{"name": "get_time", "parameters": {"zone": "CET"}}') and not guide.allows(b'[{"name": "get_time", "parameters": {"zone": "CET"}},')
    reply = completion_response("m", [('[{"name": "get_time", "parameters": {"zone": "CET"}}]', "stop", 9, None)], 5,
                                True, form)["choices"][0]
    assert reply["finish_reason"] == "stop" and reply["message"]["content"] is None  # named: "stop", as OpenAI's
    assert json.loads(reply["message"]["tool_calls"][0]["function"]["arguments"]) == {"zone": "CET"}
    unenforceable = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "number", "multipleOf": 2}}}}}
    with pytest.raises(APIError) as refused:
        forced_tool_call({"tool_choice": "required"}, [WEATHER, unenforceable])
    assert refused.value.param == "tools" and "tools[1].function.parameters.properties.n.multipleOf" in refused.value.message


def test_a_reply_with_calls_is_answered_as_openai_answers_it():
    reply = completion_response("m", [("<tool_call>\n" + CALL + "\n</tool_call>", "stop", 9, None)], 5, True, "hermes")
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_") and "index" not in call
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    untouched = completion_response("m", [("<tool_call>x", "stop", 3, None)], 5, True)  # no tools offered
    assert untouched["choices"][0]["message"] == {"role": "assistant", "content": "<tool_call>x"}


def test_parallel_tool_calls_false_allows_one_call():
    """OpenAI's parallel_tool_calls=false: a forced call is guided to one; a reply's first call is
    returned, streamed or not (as vLLM does)."""
    from launcher.openai_protocol import ToolCallStream, forced_tool_call

    second = CALL.replace("Paris", "Oslo")
    two = f"<tool_call>\n{CALL}\n</tool_call>\n<tool_call>\n{second}\n</tool_call>"
    for parallel, count in ((True, 2), (False, 1)):
        message = completion_response("m", [(two, "stop", 9, None)], 5, True, "hermes", parallel)["choices"][0][
            "message"]
        cities = [json.loads(c["function"]["arguments"])["city"] for c in message["tool_calls"]]
        assert cities == ["Paris", "Oslo"][:count]
        text, calls, called = streamed("hermes", two, parallel)
        assert text == "" and called and [json.loads(c["arguments"])["city"] for c in calls.values()] == cities
    one, _ = forced_tool_call({"tool_choice": "required", "parallel_tool_calls": False}, [WEATHER])
    guide = one.guide()
    assert guide.allows(b'[{"name": "get_weather", "parameters": {"city": "Paris"}}') and not guide.allows(
        b'[{"name": "get_weather", "parameters": {"city": "Paris"}},')
    with pytest.raises(APIError) as refused:
        forced_tool_call({"tool_choice": "required", "parallel_tool_calls": "no"}, [WEATHER])
    assert refused.value.param == "parallel_tool_calls"


@pytest.mark.slow
def test_served_model_calls_tools_over_http(qwen_dir):
    from openai import OpenAI

    from launcher.serve_app import build

    with served(build({"export_dir": str(qwen_dir), "max_batch_size": 4})) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="qwen-tools", messages=QUESTION, tools=[WEATHER],
                                               max_tokens=8, temperature=0)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

        chunks = list(client.chat.completions.create(model="qwen-tools", messages=QUESTION, tools=[WEATHER],
                                                     max_tokens=8, temperature=0, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert not any(d.content for d in deltas)  # the call's text is not streamed as content
        pieces = [call for d in deltas for call in (d.tool_calls or [])]
        assert {piece.index for piece in pieces} == {0} and pieces[0].function.name == "get_weather"
        assert json.loads("".join(piece.function.arguments for piece in pieces)) == {"city": "Paris"}
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

        # Without tools the same reply is text; with tool_choice="none" the prompt offers none.
        plain = client.chat.completions.create(model="qwen-tools", messages=QUESTION, max_tokens=8, temperature=0)
        assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "stop"
        assert plain.choices[0].message.content == "<tool_call>\n" + CALL + "\n</tool_call>"
        # a finished exchange (call, result) renders and is answered
        followed = client.chat.completions.create(model="qwen-tools", messages=HISTORY, tools=[WEATHER],
                                                  max_tokens=8, temperature=0)
        assert followed.choices[0].finish_reason in ("stop", "tool_calls", "length")

        # The Responses API: the call as a function_call item, streamed and not; the conversation goes on
        # with the call and its output as input items.
        function = {"type": "function", **WEATHER["function"]}
        response = client.responses.create(model="qwen-tools", input="Weather in Paris?", tools=[function],
                                           max_output_tokens=8, temperature=0)
        (item,) = response.output
        assert response.status == "completed" and item.type == "function_call" and item.name == "get_weather"
        assert json.loads(item.arguments) == {"city": "Paris"} and item.call_id.startswith("call_")
        events = list(client.responses.create(model="qwen-tools", input="Weather in Paris?", tools=[function],
                                              max_output_tokens=8, temperature=0, stream=True))
        assert not [e for e in events if e.type == "response.output_text.delta"]  # the call is not text
        (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert done.name == "get_weather" and json.loads(done.arguments) == {"city": "Paris"}
        assert [item.type for item in events[-1].response.output] == ["function_call"]
        went_on = client.responses.create(model="qwen-tools", tools=[function], max_output_tokens=8, temperature=0,
                                          input=[{"role": "user", "content": "Weather in Paris?"},
                                                 {"type": "function_call", "call_id": item.call_id,
                                                  "name": item.name, "arguments": item.arguments},
                                                 {"type": "function_call_output", "call_id": item.call_id,
                                                  "output": "sunny, 21 C"},
                                                 {"role": "user", "content": "And tomorrow?"}])
        assert went_on.status in ("completed", "incomplete") and went_on.output
        either_city = {**function, "parameters": {"type": "object", "required": ["city"],
                                                  "properties": {"city": {"enum": ["Paris", "Rome"]}}}}
        named = client.responses.create(model="qwen-tools", input="Weather in Paris?", tools=[either_city],
                                        tool_choice={"type": "function", "name": "get_weather"},
                                        max_output_tokens=64, temperature=0)
        (item,) = named.output  # guided to the named function's call
        assert item.type == "function_call" and json.loads(item.arguments)["city"] in ("Paris", "Rome")

        # Forced calls: the model's own choice (<tool_call> text) is refused and the reply guided to a call.
        cities = {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}}
        for choice, finish in (("required", "tool_calls"), ({"type": "function", "function": {"name": "get_weather"}},
                                                            "stop")):
            forced = client.chat.completions.create(model="qwen-tools", messages=QUESTION, tools=[cities],
                                                    tool_choice=choice, max_tokens=64, temperature=0).choices[0]
            assert forced.finish_reason == finish and forced.message.content is None
            assert [c.function.name for c in forced.message.tool_calls] == ["get_weather"]
            assert json.loads(forced.message.tool_calls[0].function.arguments)["city"] in ("Paris", "Rome")
            chunks = list(client.chat.completions.create(model="qwen-tools", messages=QUESTION, tools=[cities],
                                                         tool_choice=choice, max_tokens=64, temperature=0, stream=True))
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            assert not any(d.content for d in deltas)
            assert "".join(call.function.arguments for d in deltas for call in (d.tool_calls or [])) == \
                forced.message.tool_calls[0].function.arguments


def test_tool_calling_conversations_train_on_their_calls(qwen_dir, tmp_path):
    """A data=chat line with `tools` (here their JSON text, as some datasets store them), an assistant's
    tool_calls and the tool's result renders as transformers renders it, and the loss falls on the
    replies (the call and the answer after its result), not on the tools, the question or the result.
    A template without tools makes such a line a bad line."""
    from transformers import AutoTokenizer

    from lm.chat_data import iter_conversations, tokenize_conversation
    from lm.tokenizer import hf_directory_tokenizer

    exchange = HISTORY[:3] + [{"role": "assistant", "content": "Sunny, 21 C."}]
    (tmp_path / "calls.jsonl").write_text(json.dumps({"messages": exchange, "tools": json.dumps([WEATHER])}) + "\n")
    tokenizer = hf_directory_tokenizer(qwen_dir)
    bad = []
    (conversation,) = iter_conversations([tmp_path / "calls.jsonl"], bad, tokenizer.chat_template)
    assert not bad and conversation.tools == [WEATHER]
    ids, mask = tokenize_conversation(tokenizer, conversation, tokenizer.chat_template)
    parsed = [dict(m, tool_calls=[{**c, "function": {**c["function"], "arguments": {"city": "Paris"}}}
                                  for c in m["tool_calls"]]) if m.get("tool_calls") else m for m in exchange]
    assert tokenizer.decode(ids) == AutoTokenizer.from_pretrained(qwen_dir).apply_chat_template(
        parsed, tools=[WEATHER], tokenize=False)
    learned = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "<tool_call>\n" + CALL + "\n</tool_call><|im_end|>Sunny, 21 C.<|im_end|>"

    assert list(iter_conversations([tmp_path / "calls.jsonl"], bad)) == []  # the built-in template
    assert [b.reason for b in bad] == ["tool calls need a chat template that takes tools (a model's own, as Qwen's "
                                       "or Llama 3.1's); this one takes none"]
