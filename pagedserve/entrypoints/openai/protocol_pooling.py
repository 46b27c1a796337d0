"""Pydantic models of OpenAI's /v1/embeddings, plus vLLM's extra fields (truncate_prompt_tokens,
normalize), and of vLLM's /classify."""

from __future__ import annotations

import time
from typing import Literal, Optional, Union

from pydantic import Field

from pagedserve.entrypoints.openai.protocol import OpenAIBaseModel, Text, UsageInfo, random_id

# A string, a list of strings, a token-id list, or a list of token-id lists (OpenAI's forms).
PoolingInput = Union[Text, list[Text], list[int], list[list[int]]]


class EmbeddingRequest(OpenAIBaseModel):
    model: Optional[str] = None
    input: PoolingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None
    truncate_prompt_tokens: Optional[int] = None
    normalize: Optional[bool] = None


class EmbeddingData(OpenAIBaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]  # base64: little-endian float32 bytes, as OpenAI's


class EmbeddingResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("embd"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingData]
    usage: UsageInfo


class ClassificationRequest(OpenAIBaseModel):
    model: Optional[str] = None
    input: PoolingInput
    user: Optional[str] = None
    truncate_prompt_tokens: Optional[int] = None


class ClassificationData(OpenAIBaseModel):
    object: Literal["classification"] = "classification"
    index: int
    label: Optional[str]  # the most probable class's name (config.json id2label)
    probs: list[float]
    num_classes: int


class ClassificationResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("classify"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ClassificationData]
    usage: UsageInfo
