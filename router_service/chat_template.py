"""A checkpoint's chat template: the Jinja program that turns chat messages into the prompt text.

Rendered the way transformers' `apply_chat_template` renders it, so that a model sees the same prompt
here as under transformers (and vLLM, which does the same): a sandboxed Jinja environment with
`trim_blocks` and `lstrip_blocks`, loop controls, a `tojson` filter that keeps non-ASCII text, the
globals `raise_exception` and `strftime_now`, and as variables the messages, `add_generation_prompt`
and the special tokens by name (`bos_token`, `eos_token`, ...). The rendered text already holds any
special tokens the template adds, so it is tokenized without adding them again.

Where a checkpoint keeps its template: `tokenizer_config.json`'s `chat_template` (a string, or a list
of named templates, of which "default" is used), or a `chat_template.jinja` file beside it (the layout
newer transformers saves).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplateError(ValueError):
    """The template refused the messages (its `raise_exception`) or failed to render them."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks the assistant's tokens with it (for training
    masks); rendering a prompt, the block is its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters and non-ASCII text, which a prompt must keep as written.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source = source
        self.special_tokens = special_tokens  # e.g. {"bos_token": "<s>", "eos_token": "</s>"}
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateError as err:  # a syntax error, or a tag we do not know
            raise ChatTemplateError(f"the chat template does not compile: {err}") from None

    @staticmethod
    def source_in(model_dir: str | Path, tokenizer_config: dict) -> str | None:
        """The checkpoint's template text, or None. A chat_template.jinja file wins over tokenizer_config.json's
        entry, as in transformers, which writes the file in its newer layout."""
        path = Path(model_dir) / TEMPLATE_FILE
        if path.exists():
            source = path.read_text()
        else:
            source = tokenizer_config.get("chat_template")
            if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                source = named.get("default")
        return source if isinstance(source, str) and source.strip() else None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for these messages ({"role": ..., "content": ...} each)."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self.special_tokens)
        except jinja2.exceptions.TemplateError as err:
            raise ChatTemplateError(str(err)) from None
