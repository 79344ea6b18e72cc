"""Chat templates: the checkpoint's Jinja `chat_template` rendered the way transformers' apply_chat_template renders
it, so a conversation becomes the same text (and, through Tokenizer.encode_rendered, the same ids) as there."""
from __future__ import annotations

import json
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered: no template, or the template refused it (raise_exception)."""


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _tojson(x, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # transformers' tojson: unlike Jinja's built-in, it does not HTML-escape
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """One compiled template; rendering is pure (a sandboxed environment: a template cannot touch the process)."""

    def __init__(self, source: str, bos_token: str, eos_token: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not messages:
            raise ChatTemplateError("messages must not be empty")
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token, tools=None,
                                        documents=None)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError) as exc:
            raise ChatTemplateError(f"the chat template failed: {exc}") from exc


def load_chat_template(source: str, bos_token: str, eos_token: str) -> ChatTemplate | None:
    """None when the checkpoint has no template; a template that does not compile is an error at start."""
    if not source:
        return None
    try:
        return ChatTemplate(source, bos_token, eos_token)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"the checkpoint's chat template does not compile: {exc}") from exc
