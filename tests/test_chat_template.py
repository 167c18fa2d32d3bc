"""A pretrained model's own chat template (tokenizer_config.json's Jinja): rendered as transformers'
`apply_chat_template` renders it, its replies' loss mask equal to transformers' assistant mask, its
end-of-turn marker the server's stop, conversations it refuses or rewrites reported as bad lines,
and the template kept with the data cache (unless data.chat_template=builtin) so the run serves with
what it was trained on."""

import json

import pytest

from lm.chat_template import BUILTIN, ChatTemplate, ChatTemplateError, hf_chat_template
from lm.config import ConfigError, DataConfig
from lm.tokenizer import ByteBPETokenizer, hf_directory_tokenizer, load_tokenizer

TEXT = ["def main(argv):\n    return sorted(set(argv))\n" * 20, "What is the capital of Foo? Bar. " * 30]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>"]

# Qwen2.5's ChatML (a default system prompt), with transformers' {% generation %} marks around replies.
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}{%- if message.role == 'assistant' %}"
    "{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message.content + '<|im_end|>\\n' }}{%- endif %}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# Llama 3.1's shape: BOS, headers, today's date from strftime_now, trimmed content.
LLAMA3 = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- if strftime_now is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nToday Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
# Mistral's: no system role, user and assistant must alternate.
MISTRAL = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- message['content'] + eos_token }}{%- endif %}{%- endfor %}")
# Keeps only the last reply's text (as reasoning models drop earlier turns' thinking).
REWRITES_HISTORY = (
    "{%- for message in messages %}{{- message.role + ': ' }}"
    "{%- if message.role == 'assistant' and not loop.last %}(earlier reply){%- else %}{{- message.content }}{%- endif %}"
    "{{- '\\n' }}{%- endfor %}{%- if add_generation_prompt %}assistant: {%- endif %}")
TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": "</s>"}

CONVERSATIONS = [
    [{"role": "user", "content": "Capital of Foo?"}, {"role": "assistant", "content": "Bar."}],
    [{"role": "system", "content": "Be terse. "}, {"role": "user", "content": "Capital of Foo?"},
     {"role": "assistant", "content": "Bar."}, {"role": "user", "content": "And of Baz?"},
     {"role": "assistant", "content": "Qux, naïvely."}],
]


@pytest.fixture(scope="module")
def hf_tokenizer_dirs(tmp_path_factory):
    """One Hugging Face tokenizer directory per template: tokenizer.json with the templates' special
    tokens, tokenizer_config.json with the template and the tokens it names."""
    tokenizer = ByteBPETokenizer.train(iter(TEXT), vocab_size=400)
    tokenizer._tok.add_special_tokens(SPECIALS[1:])
    root = tmp_path_factory.mktemp("templates")
    dirs = {}
    for name, source in {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL}.items():
        directory = root / name
        directory.mkdir()
        tokenizer.save(directory / "tokenizer.json")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": source, "eos_token": "</s>",
                  "bos_token": {"content": TOKENS["bos_token"], "special": True, "__type": "AddedToken"}}
        if name == "chatml":
            config["eos_token"] = "<|im_end|>"
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
        dirs[name] = directory
    return dirs


def test_templates_render_as_transformers_renders_them(hf_tokenizer_dirs):
    from transformers import AutoTokenizer

    for name, directory in hf_tokenizer_dirs.items():
        theirs, ours = AutoTokenizer.from_pretrained(directory), hf_chat_template(directory)
        assert ours.special_tokens["bos_token"] == TOKENS["bos_token"]  # from an AddedToken object
        for messages in CONVERSATIONS[:1] if name == "mistral" else CONVERSATIONS:
            for add in (True, False):
                expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
                assert ours.render(messages, add) == expected, (name, add)


def test_reply_mask_equals_transformers_assistant_mask(hf_tokenizer_dirs):
    """The spans found by rendering the conversation as it grows are the ones transformers marks with
    {% generation %}: each reply and the <|im_end|> that ends it, not the newline after."""
    from transformers import AutoTokenizer

    from lm.chat_data import tokenize_conversation

    directory = hf_tokenizer_dirs["chatml"]
    theirs, ours = AutoTokenizer.from_pretrained(directory), hf_directory_tokenizer(directory)
    for messages in CONVERSATIONS:
        expected = theirs.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
        ids, mask = tokenize_conversation(ours, messages, ours.chat_template)
        assert ids == expected["input_ids"]
        assert [int(m) for m in mask] == expected["assistant_masks"]
        assert ours.decode([i for i, m in zip(ids, mask) if m]) == "".join(
            m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")


def test_end_of_turn_is_what_the_template_writes_after_a_reply(hf_tokenizer_dirs):
    ends = {name: hf_chat_template(directory).end_of_turn for name, directory in hf_tokenizer_dirs.items()}
    assert ends == {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>"}
    assert BUILTIN.end_of_turn == "<|end|>"


def test_generation_stops_at_the_models_end_of_turn_token(hf_tokenizer_dirs):
    """A served or sampled instruct model stops at the token that ends its reply (what its
    generation_config.json lists), in completions too, besides end-of-text."""
    from lm.tokenizer import stop_ids

    for name, ends in {"chatml": ["<|im_end|>"], "llama3": ["<|eot_id|>", "</s>"], "mistral": ["</s>"]}.items():
        tokenizer = hf_directory_tokenizer(hf_tokenizer_dirs[name])
        assert stop_ids(tokenizer) == {tokenizer.eot_id, *(tokenizer.encode(end)[0] for end in ends)}, name
    tokenizer.chat_template = None
    assert stop_ids(tokenizer) == {tokenizer.eot_id}


def test_the_builtin_template_keeps_its_masks():
    text, spans = BUILTIN.answer_spans(CONVERSATIONS[1])
    assert [text[a:b] for a, b in spans] == ["Bar.\n<|end|>", "Qux, naïvely.\n<|end|>"]


def test_refused_and_rewritten_conversations_are_bad_lines(hf_tokenizer_dirs, tmp_path):
    from lm.chat_data import iter_conversations

    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in CONVERSATIONS) + "\n")
    bad = []
    assert list(iter_conversations([path], bad, hf_chat_template(hf_tokenizer_dirs["mistral"]))) == CONVERSATIONS[:1]
    assert [(b.lineno, b.reason) for b in bad] == [
        (2, "the chat template refuses this conversation: Conversation roles must alternate "
            "user/assistant/user/assistant/...")]
    bad = []
    assert list(iter_conversations([path], bad, ChatTemplate(REWRITES_HISTORY))) == CONVERSATIONS[:1]
    assert bad[0].lineno == 2 and "renders message 2 differently once the conversation goes on" in bad[0].reason
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        ChatTemplate("{% for m in messages %}").check()


def test_a_template_that_refuses_most_conversations_stops_the_run_and_names_the_way_out(hf_tokenizer_dirs, tmp_path):
    from lm.data import prepare_data

    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"messages": CONVERSATIONS[1]}) for _ in range(4)) + "\n")
    data = DataConfig(name="chat", source="chat", path=str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"4 of 4 lines are bad, .*Conversation roles must alternate.*; "
                                          r"data.chat_template=builtin renders conversations with the built-in"):
        prepare_data(data, progress=False, tokenizer=hf_directory_tokenizer(hf_tokenizer_dirs["mistral"]), seq_len=64)
    data.chat_template = "builtin"
    assert prepare_data(data, progress=False, tokenizer=hf_directory_tokenizer(hf_tokenizer_dirs["mistral"]),
                        seq_len=64).meta["documents"] == 4


def test_a_template_file_and_named_templates_are_read(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": CHATML}]}))
    assert hf_chat_template(tmp_path).source == CHATML
    (tmp_path / "chat_template.jinja").write_text(LLAMA3)  # transformers' newer place for it wins
    assert hf_chat_template(tmp_path).source == LLAMA3
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert hf_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ChatTemplateError, match="tokenizer_config.json is not valid JSON"):
        hf_chat_template(tmp_path)


def write_qa(path, n: int = 12) -> None:
    path.write_text("\n".join(json.dumps({"prompt": f"Capital of Land{i}?", "completion": f"City{i}."})
                              for i in range(n)) + "\n")


def test_the_data_cache_keeps_the_template_it_rendered_with(hf_tokenizer_dirs, tmp_path):
    from lm.data import prepare_data

    write_qa(tmp_path / "qa.jsonl")
    tokenizer = hf_directory_tokenizer(hf_tokenizer_dirs["chatml"])
    data = DataConfig(name="chat", source="chat", path=str(tmp_path / "qa.jsonl"), cache_dir=str(tmp_path / "cache"),
                      val_fraction=0.2)
    own = prepare_data(data, progress=False, tokenizer=tokenizer, seq_len=64)
    assert own.tokenizer().chat_template == tokenizer.chat_template
    tokens, mask = own.tokens("train"), own.loss_mask("train")
    answers = own.tokenizer().decode(int(t) for t, m in zip(tokens, mask) if m)
    assert "<|im_end|>" in answers and "<|im_start|>" not in answers and "Capital" not in answers
    assert "<|im_start|>user\nCapital of Land" in own.tokenizer().decode(tokens.tolist())

    data.chat_template = "builtin"
    builtin = prepare_data(data, progress=False, tokenizer=tokenizer, seq_len=64)
    assert builtin.directory != own.directory and builtin.tokenizer().chat_template is None
    assert "<|user|>\nCapital of Land" in builtin.tokenizer().decode(builtin.tokens("train").tolist())

    data.chat_template = "auto"
    tokenizer.chat_template = ChatTemplate("{{ messages[0]['nonexistent'].content }}")
    with pytest.raises(ConfigError, match=r"^data.chat_template='auto' takes the pretrained model's own template, "
                                          r"which fails on a user/assistant exchange .*allowed: auto, or builtin"):
        prepare_data(data, progress=False, tokenizer=tokenizer, seq_len=64)


def test_the_template_travels_with_a_saved_tokenizer(hf_tokenizer_dirs, tmp_path):
    from lm.tokenizer import copy_tokenizer

    tokenizer = hf_directory_tokenizer(hf_tokenizer_dirs["llama3"])
    tokenizer.save(tmp_path / "tokenizer.json")
    (tmp_path / "copy").mkdir()
    copy_tokenizer(tmp_path / "tokenizer.json", tmp_path / "copy" / "tokenizer.json")
    assert load_tokenizer(tmp_path / "copy" / "tokenizer.json").chat_template == tokenizer.chat_template


def test_hugging_face_export_carries_the_template(hf_tokenizer_dirs):
    from lm.config import ModelConfig
    from lm.hf_format import hf_tokenizer_config

    tokenizer = hf_directory_tokenizer(hf_tokenizer_dirs["chatml"])
    config = hf_tokenizer_config(tokenizer, ModelConfig())
    assert config["chat_template"] == CHATML and config["eos_token"] == "<|im_end|>"
    assert config["bos_token"] == TOKENS["bos_token"]
    tokenizer.chat_template = None
    assert hf_tokenizer_config(tokenizer, ModelConfig())["chat_template"] == BUILTIN.source


def test_server_renders_and_stops_with_the_models_template(hf_tokenizer_dirs):
    """Chat prompts are the model's template's text, replies stop at its end-of-turn marker, and the
    tokenizer's BOS is added to completion prompts only."""
    from launcher.openai_protocol import APIError, adds_special_tokens, chat_prompt, sampling_params, tokenize_text

    chatml, mistral = (hf_chat_template(hf_tokenizer_dirs[name]) for name in ("chatml", "mistral"))
    body = {"messages": [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
            "stop": "###"}
    assert chat_prompt(body, chatml) == ("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                         "<|im_start|>assistant\n")
    assert sampling_params(body, 64, chatml).stop == ["###", "<|im_end|>"]
    assert sampling_params(body, 64).stop == ["###"]  # completions: the caller's stops only
    # vLLM's add_special_tokens: a chat prompt holds what the template wrote (a Llama template's BOS), a
    # completion prompt is encoded as tokenizer(prompt) is
    assert not adds_special_tokens(body, chat=True) and adds_special_tokens({"prompt": "x"}, chat=False)
    assert not adds_special_tokens({"prompt": "x", "add_special_tokens": False}, chat=False)
    assert tokenize_text(body, chatml) == (chat_prompt(body, chatml), False)
    assert tokenize_text({"prompt": "x"}, chatml) == ("x", True)
    with pytest.raises(APIError) as refused:
        chat_prompt(body, mistral)
    assert refused.value.status == 400 and refused.value.param == "messages"
    assert "Conversation roles must alternate" in refused.value.message
