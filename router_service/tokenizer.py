"""The checkpoint's tokenizer.json, through Hugging Face `tokenizers` (no transformers)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream

from router_service.chat_template import ChatTemplate, ChatTemplateError

log = logging.getLogger(__name__)

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.hf = _HFTokenizer.from_file(str(self.path))
        config = self.path.parent / "tokenizer_config.json"
        self._config = json.loads(config.read_text()) if config.exists() else {}
        self.bos_token_id = self._special_id("bos_token")
        self.eos_token_id = self._special_id("eos_token")
        # tokenizer_config's add_bos_token is applied by transformers, not by tokenizer.json.
        self.add_bos = bool(self._config.get("add_bos_token", False)) and self.bos_token_id is not None
        special = {key: self._special_text(key) for key in SPECIAL_TOKEN_KEYS}
        self.chat_template: ChatTemplate | None = None
        self.chat_template_problem = "this model has no chat template (tokenizer_config.json's chat_template)"
        source = ChatTemplate.source_in(self.path.parent, self._config)
        if source is not None:
            try:
                self.chat_template = ChatTemplate(source, {k: v for k, v in special.items() if v is not None})
            except ChatTemplateError as err:  # completions must still work: chat says why it cannot
                log.warning("%s: %s", self.path.parent, err)
                self.chat_template_problem = str(err)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "Tokenizer | None":
        path = Path(model_dir) / "tokenizer.json"
        return cls(path) if path.exists() else None

    def _special_text(self, key: str) -> str | None:
        # tokenizer_config.json names special tokens by content, as a string or an AddedToken dict.
        token = self._config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        return token if isinstance(token, str) else None

    def _special_id(self, key: str) -> int | None:
        token = self._special_text(key)
        return self.hf.token_to_id(token) if token is not None else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    def token_text(self, token_id: int) -> str:
        """One token's text as it reads on its own (special tokens included), e.g. for log-prob listings;
        a token that is part of a multi-byte character reads as replacement characters."""
        return self.hf.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat template rendered over `messages`; the template places any special tokens
        (bos included) itself. Raises LookupError when the checkpoint has no usable template (saying why),
        ChatTemplateError when the template refuses the messages."""
        if self.chat_template is None:
            raise LookupError(self.chat_template_problem)
        return self.encode(self.chat_template.render(messages, add_generation_prompt), add_special_tokens=False)

    def stream(self) -> "TextStream":
        return TextStream(self)


class TextStream:
    """Incremental detokenisation: text pieces as tokens arrive, whole UTF-8 characters only."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer.hf
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tokenizer, token_id) or ""
