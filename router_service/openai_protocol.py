"""The OpenAI API's request and response objects, and their mapping to engine requests and outputs.

Requests are pydantic models that forbid unknown fields: a field this server does not know, or
supports only at its neutral value (`frequency_penalty` and `presence_penalty` 0, `repetition_penalty`
1, an empty `logit_bias`, `echo: false`, `best_of: 1`, `response_format: {"type": "text"}`) with
another value, is refused with InvalidRequest naming it, never ignored. null means the default.
Fields as in OpenAI's API reference, plus vLLM's extensions `top_k`, `ignore_eos` and
`add_generation_prompt`. Defaults are OpenAI's: temperature 1, top_p 1, 16 tokens for completions and
the rest of the context for chat.

Choices: each prompt (completions take a list) times `n`; choice i of prompt p has index p * n + i,
and with a seed, choice i samples with seed + i (reproducible, and the n choices differ).
No I/O here: `router_service.http_server` serves these objects.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from router_service.engine import FinishReason, Request, StepOutput
from router_service.errors import InvalidRequest
from router_service.sampling import MAX_TOP_LOGPROBS, SamplingParams
from router_service.tokenizer import Tokenizer

MAX_N = 16  # choices per request: each is a sequence in the batch
MAX_COMPLETION_LOGPROBS = 5  # the completions API's limit on `logprobs`
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# Engine finish reasons in OpenAI's words; "abort": cancelled while draining (vLLM says the same).
OPENAI_FINISH: dict[FinishReason, str] = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        # OpenAI's API reference marks most fields nullable, and clients send unset ones as null: null means
        # the default. (A field without a default, such as `prompt`, is still required.)
        if isinstance(data, dict):
            return {k: v for k, v in data.items()
                    if v is not None or k not in cls.model_fields or cls.model_fields[k].is_required()}
        return data


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    """Fields both endpoints take."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    user: str | None = None  # accepted for the caller's bookkeeping; not used
    top_k: int | None = Field(None, ge=-1)  # vLLM: -1 or 0 (or absent) is off
    ignore_eos: bool = False
    # Accepted only at the value that changes nothing: clients such as LangChain and `vllm bench serve` send
    # them by default (repetition_penalty is vLLM's).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None

    def _check_neutral(self) -> None:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise InvalidRequest(name, "is not supported (only 0)")
        if self.repetition_penalty != 1.0:
            raise InvalidRequest("repetition_penalty", "is not supported (only 1)")
        if self.logit_bias:
            raise InvalidRequest("logit_bias", "is not supported (only empty)")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options", "is only allowed with stream: true")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling(self, max_tokens: int, logprobs: bool, top_logprobs: int, choice: int) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k or 0, 0),
            seed=None if self.seed is None else self.seed + choice, max_tokens=max_tokens, stop=tuple(stops),
            ignore_eos=self.ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    best_of: int | None = None

    def check(self) -> None:
        self._check_neutral()
        if self.echo:
            raise InvalidRequest("echo", "is not supported (only false)")
        if self.best_of not in (None, 1):
            raise InvalidRequest("best_of", "is not supported (only 1)")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = ""  # null (an assistant turn replayed without text) reads as empty
    name: str | None = None  # passed to the template, which may use it

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    # vLLM's extension: false leaves out the template's opening of the assistant's turn (the prompt then ends
    # where the messages end, e.g. after a closed assistant turn).
    add_generation_prompt: bool = True

    def check(self) -> None:
        self._check_neutral()
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs", "needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise InvalidRequest("max_completion_tokens", "set it or max_tokens, not both")

    def template_messages(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role; the templates know "system".
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text(),
                 **({"name": m.name} if m.name is not None else {})} for m in self.messages]


def parse(model: type[_Common], body: Any) -> _Common:
    """The request object, or InvalidRequest naming the first bad field (dotted, e.g. messages.0.role)."""
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as err:
        # A value that fits no member of a union fails once per member: the one that got furthest says most.
        worst = max(err.errors(), key=lambda e: len(e["loc"]))
        field = ".".join(str(part) for part in worst["loc"] if not _is_union_member(part)) or "body"
        message = "is not a known or supported field" if worst["type"] == "extra_forbidden" else worst["msg"]
        raise InvalidRequest(field, message) from None
    request.check()
    return request


def _is_union_member(loc_part) -> bool:
    """pydantic names the union member an error is about inside the location: 'str', 'list[TextPart]'."""
    return isinstance(loc_part, str) and (loc_part in {"str", "int", "float", "bool", "dict", "list"}
                                          or "[" in loc_part)


# --- requests -> engine requests ---------------------------------------------------------------------------


@dataclass
class Choice:
    """One sequence to generate: its index among the response's choices and the engine request."""

    index: int
    prompt_index: int  # which prompt it continues (usage counts each prompt once)
    request: Request


def _prompts(req: CompletionRequest, tokenizer: Tokenizer | None) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], str)):
        texts = [p] if isinstance(p, str) else p
        if tokenizer is None:
            raise InvalidRequest("prompt", "this model has no tokenizer; send token ids")
        return [tokenizer.encode(t) for t in texts]
    if not p:
        raise InvalidRequest("prompt", "is empty")
    return [p] if isinstance(p[0], int) else p


def completion_choices(req: CompletionRequest, tokenizer: Tokenizer | None, response_id: str) -> list[Choice]:
    logprobs = req.logprobs is not None
    choices = []
    for p, ids in enumerate(_prompts(req, tokenizer)):
        for i in range(req.n):
            params = req._sampling(req.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS, logprobs, req.logprobs or 0, i)
            index = p * req.n + i
            choices.append(Choice(index, p, Request(f"{response_id}-{index}", list(ids), params)))
    return choices


def chat_choices(req: ChatCompletionRequest, tokenizer: Tokenizer | None, max_model_len: int,
                 response_id: str) -> list[Choice]:
    if tokenizer is None:
        raise InvalidRequest("messages", "this model has no tokenizer; use /v1/completions with token ids")
    from router_service.chat_template import ChatTemplateError

    try:
        ids = tokenizer.apply_chat_template(req.template_messages(), req.add_generation_prompt)
    except LookupError as err:  # no template, or one that does not compile
        raise InvalidRequest("messages", f"{err.args[0]}; use /v1/completions") from None
    except ChatTemplateError as err:
        raise InvalidRequest("messages", f"the model's chat template refused them: {err}") from None
    # Default: the rest of the context (at least one token, so that an overlong prompt is refused by the
    # engine's own check, naming the prompt).
    max_tokens = req.max_completion_tokens or req.max_tokens or max(max_model_len - len(ids), 1)
    return [Choice(i, 0, Request(f"{response_id}-{i}", list(ids),
                                 req._sampling(max_tokens, req.logprobs, req.top_logprobs or 0, i)))
            for i in range(req.n)]


# --- engine outputs -> responses -----------------------------------------------------------------------------


def new_id(kind: Literal["cmpl", "chatcmpl"]) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def created() -> int:
    return int(time.time())


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class UsageCount:
    """A response's usage: each prompt's tokens once (however many choices continue it), every choice's output."""

    def __init__(self):
        self.prompt_tokens: dict[int, int] = {}  # prompt index -> tokens
        self.completion_tokens = 0

    def finished(self, choice: Choice, out: StepOutput) -> None:
        self.prompt_tokens[choice.prompt_index] = out.prompt_tokens
        self.completion_tokens += out.completion_tokens

    def body(self) -> dict:
        return usage(sum(self.prompt_tokens.values()), self.completion_tokens)


class LogprobListing:
    """Log-prob listings in OpenAI's two shapes, with each token's own text, for the choices of one response."""

    def __init__(self, tokenizer: Tokenizer | None, num_choices: int):
        self.tokenizer = tokenizer
        self._offsets = [0] * num_choices  # completions' text_offset: characters of the tokens listed so far

    def token(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id) if self.tokenizer is not None else f"token_id:{token_id}"

    def completion(self, choice: int, out: StepOutput) -> dict:
        """The completions API's `logprobs` for one output's tokens. Offsets count the tokens' own texts, so
        they stay consistent with `tokens` when text is held back (a possible stop string) or a character
        spans tokens."""
        tokens = [self.token(t) for t in out.token_ids]
        offsets = []
        for t in tokens:
            offsets.append(self._offsets[choice])
            self._offsets[choice] += len(t)
        top = [{self.token(t): lp for t, lp in alts} for alts in out.top_logprobs] if out.top_logprobs else None
        return {"tokens": tokens, "token_logprobs": list(out.logprobs), "top_logprobs": top, "text_offset": offsets}

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.token(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def chat(self, out: StepOutput) -> dict:
        """The chat API's `logprobs` for one output's tokens."""
        content = []
        for i, (t, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            alts = out.top_logprobs[i] if out.top_logprobs else []
            content.append({**self._entry(t, lp), "top_logprobs": [self._entry(a, alp) for a, alp in alts]})
        return {"content": content}
