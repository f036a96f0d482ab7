"""A generation request as every dialect translates it and the inference process receives it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class GenerationRequest(BaseModel):
    """One prompt (chat messages, or raw text), how to sample its completions, and the model's weights."""

    model_config = ConfigDict(extra="forbid")

    # Where the weights are (filled in from the service's Target; the inference process trusts them).
    base: str = ""
    adapter: str | None = None
    trust_remote_code: bool = False
    # Exactly one of the two: messages go through the model's chat template, a prompt is used as it is.
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    # None: as many as the context leaves room for.
    max_tokens: int | None = Field(None, ge=1)
    # 0: greedy.
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    n: int = Field(1, ge=1)
