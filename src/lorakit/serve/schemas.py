"""The request bodies the server accepts (OpenAI's, validated with pydantic) and the errors it answers with.

Fields OpenAI clients send that the server does not act on but that do not change the answer (``user``,
``logit_bias: {}``, penalties of 0, ``response_format: {"type": "text"}``) are accepted; fields that would
change it and are not implemented (``logprobs``, ``tools``, ``suffix``, non-zero penalties, ``best_of`` other
than ``n``, images) are refused with 400 naming the field, so a client never silently gets something else. Unknown
fields are ignored, as the OpenAI API does for forward compatibility. Two of vLLM's extensions are accepted
with vLLM's meaning: ``min_tokens`` (no stop token before that many tokens) and ``ignore_eos`` (stop tokens do not
end the answer), which give answers of a fixed length for benchmarks; stop strings still apply.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: OpenAI's default for ``max_tokens`` in /v1/completions (chat has none: up to the context or the server's cap).
COMPLETION_MAX_TOKENS = 16
MAX_STOP_STRINGS = 4

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An HTTP error with OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _unsupported(field: str, why: str = "") -> ValueError:
    return ValueError(f"{field} is not supported by lorakit serve{why}")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # OpenAI's default: 1
    top_p: float | None = Field(None, gt=0.0, le=1.0)  # OpenAI's default: 1
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions (its OpenAI server takes them the same way): fixed answer lengths for benchmarks
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Sampling:
        if self.presence_penalty or self.frequency_penalty:
            raise _unsupported("presence_penalty/frequency_penalty other than 0")
        if self.logit_bias:
            raise _unsupported("logit_bias")
        if len(self.stop_strings()) > MAX_STOP_STRINGS:
            raise ValueError(f"stop holds {len(self.stop_strings())} strings; at most {MAX_STOP_STRINGS} are accepted")
        limit = self.max_tokens if self.max_tokens is not None else getattr(self, "max_completion_tokens", None)
        if limit is not None and self.min_tokens > limit:
            raise ValueError(f"min_tokens={self.min_tokens} is over max_tokens={limit}")
        return self

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def temperature_or_default(self) -> float:
        return 1.0 if self.temperature is None else self.temperature

    def top_p_or_default(self) -> float:
        return 1.0 if self.top_p is None else self.top_p

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, token ids, or lists of token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _refuse_completion_extras(self) -> CompletionRequest:
        if self.logprobs is not None:
            raise _unsupported("logprobs")
        if self.suffix:
            raise _unsupported("suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise _unsupported("best_of other than n")
        if isinstance(self.prompt, list) and (not self.prompt or any(p in ("", []) for p in self.prompt)):
            raise ValueError("prompt holds an empty entry; give text or token ids")
        if self.prompt == "":
            raise ValueError("prompt is empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per entry: text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]  # one prompt of token ids
        return list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, str]:
        """``{"role", "content"}`` as chat templates take it (``developer`` is OpenAI's new name for system)."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: ``messages`` rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _refuse_chat_extras(self) -> ChatCompletionRequest:
        if self.logprobs or self.top_logprobs:
            raise _unsupported("logprobs")
        if self.tools or self.functions or self.tool_choice not in (None, "none"):
            raise _unsupported("tools (function calling)")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise _unsupported('response_format other than {"type": "text"}')
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class AdapterLoad(BaseModel):
    """``POST /v1/adapters``: load the adapter folder ``path`` (under ``--adapter-root``) as ``name``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    path: str = Field(min_length=1)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """``(message, param)`` for pydantic's first error: the field, and what is wrong with it."""
    if not errors:
        return "the request body is not valid", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON{': ' + str(detail) if detail else ''}", None
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing":
        return f"{param} is required", param
    return (f"{param}: {message}" if param else message), param
