"""The checkpoint's tokenizer.json, through Hugging Face `tokenizers` (no transformers)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream


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

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "Tokenizer | None":
        path = Path(model_dir) / "tokenizer.json"
        return cls(path) if path.exists() else None

    def _special_id(self, key: str) -> int | None:
        # tokenizer_config.json names bos/eos by content; map it to an id.
        token = self._config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        return self.hf.token_to_id(token) if isinstance(token, str) else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    def stream(self) -> "TextStream":
        return TextStream(self)


class TextStream:
    """Incremental detokenisation: text pieces as tokens arrive, whole UTF-8 characters only."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer.hf
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tokenizer, token_id) or ""
