"""Chat templates: how a list of messages becomes one prompt, for serving and for fine-tuning.

The built-in template, for models trained here from scratch:

    <|system|>
    You are terse.
    <|user|>
    Capital of France?
    <|assistant|>
    Paris.
    <|end|>

Each message is `<|role|>\\n{content}\\n<|end|>\\n`; a prompt for a reply ends with `<|assistant|>\\n`,
and the reply ends at `<|end|>` (a stop string for the server).

A model fine-tuned from a Hugging Face directory brings its own template (Jinja, in
tokenizer_config.json or chat_template.jinja, with the special tokens it names: Llama 3's headers,
Qwen's ChatML, ...). It is rendered as transformers' `apply_chat_template` renders it, so the model is
trained and served in the format it was instruction-tuned with, and it travels with the tokenizer
(`chat_template.json` beside tokenizer.json) into checkpoints and exports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path

from lm.tool_calls import tool_format

ROLES = ("system", "user", "assistant")
END = "<|end|>"
FILE = "chat_template.json"  # beside tokenizer.json, where a tokenizer carries a template of its own
# The special tokens tokenizer_config.json names and templates refer to ({{ bos_token }}).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def render_message(role: str, content: str) -> str:
    return f"<|{role}|>\n{content}\n{END}\n"


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    text = "".join(render_message(m["role"], m["content"]) for m in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text


# The same template in Jinja, as Hugging Face tokenizers carry theirs (`chat_template`): for clients
# that render prompts themselves (a server's /tokenizer_info, `apply_chat_template`).
JINJA_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n" + END
                  + "\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


class ChatTemplateError(ValueError):
    """A template that fails on a conversation (a template may refuse one: "roles must alternate")."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # Jinja
    special_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def is_builtin(self) -> bool:
        return self.source == JINJA_TEMPLATE

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """`tools`: OpenAI's function tools ({"type": "function", "function": {name, parameters}}), which a
        template that takes them writes into the prompt, as transformers' `apply_chat_template(tools=...)`."""
        if tools and not self.takes_tools:
            raise ChatTemplateError("this model's chat template does not take tools")
        if self.is_builtin:  # the same text, without Jinja
            return render_chat(messages, add_generation_prompt)
        try:
            return _compiled(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 tools=tools or None, documents=None, **self.special_tokens)
        except ChatTemplateError:
            raise
        except Exception as error:  # a template's raise_exception, or a template that breaks on this input
            raise ChatTemplateError(f"the chat template fails on this conversation: {error}") from None

    def answer_spans(self, messages: list[dict], tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
        """The conversation's text and the character spans of the assistant's replies, each with the
        marker that ends it (so a model learns to stop), without the whitespace after that marker. A reply
        starts where the text rendered up to it with a generation prompt ends, and stops where the
        text rendered up to and including it ends: a template that renders earlier turns differently as a
        conversation grows has no such spans (ChatTemplateError). The last conversation's result is kept:
        data preparation checks a conversation as it reads it, then renders the same one. `tools`: the
        tools its prompt offered (a tool-calling conversation), written in by the template."""
        key = json.dumps([messages, tools], ensure_ascii=False)
        if (last := self.__dict__.get("_last_spans")) and last[0] == key:
            return last[1]
        result = self._answer_spans(messages, tools)
        self.__dict__["_last_spans"] = (key, result)  # (frozen: set as cached_property sets its value)
        return result

    def _answer_spans(self, messages: list[dict], tools: list[dict] | None) -> tuple[str, list[tuple[int, int]]]:
        text = self.render(messages, add_generation_prompt=False, tools=tools)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True, tools=tools)
            upto = self.render(messages[:i + 1], add_generation_prompt=False, tools=tools).rstrip()
            if not (upto.startswith(prompt) and text.startswith(upto)):
                raise ChatTemplateError(f"the chat template renders message {i} differently once the conversation "
                                        "goes on, so its reply has no fixed place to learn from")
            spans.append((len(prompt), len(upto)))
        return text, spans

    @cached_property
    def takes_tools(self) -> bool:
        """Whether the template writes a `tools` list into the prompt (an instruct model tuned to call them)."""
        return not self.is_builtin and "tools" in _variables(self.source)

    @cached_property
    def tool_format(self) -> str | None:
        """How the model writes its tool calls (lm.tool_calls), None where the template takes no tools."""
        return tool_format(self.source, self.takes_tools)

    @cached_property
    def end_of_turn(self) -> str:
        """The marker that closes an assistant's reply (a stop string for the server): what the template
        writes after a reply's content (`<|im_end|>`, `<|eot_id|>`, `</s>`), else the EOS token."""
        probe = "lmstack-reply-probe"
        text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
                           add_generation_prompt=False)
        after = text.split(probe, 1)[-1].strip().split()
        return after[0] if after else self.special_tokens.get("eos_token", "")

    def check(self) -> None:
        """Raises ChatTemplateError unless the template renders a plain exchange with its reply's span."""
        exchange = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        self.answer_spans(exchange)

    def to_json(self) -> str:
        return json.dumps({"chat_template": self.source, **self.special_tokens}, ensure_ascii=False, indent=1)

    @classmethod
    def from_json(cls, text: str) -> ChatTemplate:
        data = json.loads(text)
        return cls(data["chat_template"], {k: v for k, v in data.items() if k in SPECIAL_TOKENS and isinstance(v, str)})


BUILTIN = ChatTemplate(JINJA_TEMPLATE)


def hf_chat_template(directory: str | Path) -> ChatTemplate | None:
    """A Hugging Face directory's own template: chat_template.jinja (transformers 4.5x and later write
    it), else tokenizer_config.json's `chat_template` (a string, or named templates: "default"), with
    that file's special tokens; None where the model has none."""
    directory = Path(directory)
    config_file = directory / "tokenizer_config.json"
    try:
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
    except json.JSONDecodeError as error:
        raise ChatTemplateError(f"tokenizer_config.json is not valid JSON: {error}") from None
    if (directory / "chat_template.jinja").exists():
        source = (directory / "chat_template.jinja").read_text()
    else:
        source = config.get("chat_template")
        if isinstance(source, list):
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"),
                          None)
    if not isinstance(source, str) or not source.strip():
        return None
    tokens = {name: _token_text(config[name]) for name in SPECIAL_TOKENS if _token_text(config.get(name))}
    return ChatTemplate(source, tokens)


def _token_text(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken object."""
    return token.get("content") if isinstance(token, dict) else token if isinstance(token, str) else None


@lru_cache(maxsize=8)
def _variables(source: str) -> set[str]:
    """The names a template reads from what it is rendered with."""
    from jinja2 import meta

    return meta.find_undeclared_variables(_compiled(source).environment.parse(source))


@lru_cache(maxsize=8)
def _compiled(source: str):
    """The template in the environment transformers renders chat templates in (sandboxed, blocks
    trimmed, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text, `{% generation %}`)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` marks the reply for transformers' assistant masks;
        the spans here come from rendering, so the tag renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise ChatTemplateError(f"the chat template refuses this conversation: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationTag, loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ChatTemplateError(f"the chat template is not valid Jinja: {error}") from None
