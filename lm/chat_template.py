"""The chat template: how a list of messages becomes one prompt, for serving and for fine-tuning.

    <|system|>
    You are terse.
    <|user|>
    Capital of France?
    <|assistant|>
    Paris.
    <|end|>

Each message is `<|role|>\\n{content}\\n<|end|>\\n`; a prompt for a reply ends with `<|assistant|>\\n`,
and the reply ends at `<|end|>` (a stop string for the server).
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant")
END = "<|end|>"


def render_message(role: str, content: str) -> str:
    return f"<|{role}|>\n{content}\n{END}\n"


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    text = "".join(render_message(m["role"], m["content"]) for m in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text


# The same template in Jinja, as Hugging Face tokenizers carry theirs (`chat_template`): for clients
# that render prompts themselves (a server's /tokenizer_info, `apply_chat_template`).
JINJA_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n" + END
                  + "\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
