"""Pydantic models of OpenAI's /v1/embeddings, plus vLLM's extra fields (truncate_prompt_tokens,
normalize), and of vLLM's /classify, /score and /rerank (Jina and Cohere's rerank shape)."""

from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

from pydantic import Field

from pagedserve.entrypoints.openai.protocol import (ChatMessage, ChatTemplateFields, OpenAIBaseModel, Text, UsageInfo,
                                                    random_id)
from pagedserve.errors import ParamError

# A string, a list of strings, a token-id list, or a list of token-id lists (OpenAI's forms).
PoolingInput = Union[Text, list[Text], list[int], list[list[int]]]


class EmbeddingRequest(OpenAIBaseModel):
    model: Optional[str] = None
    input: Optional[PoolingInput] = None
    # vLLM's chat form: a conversation rendered with the chat template and embedded whole
    # (instead of `input`); no generation prompt unless asked for.
    messages: Optional[list[ChatMessage]] = None
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    add_special_tokens: bool = False
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None
    truncate_prompt_tokens: Optional[int] = None
    priority: int = 0  # vLLM's: under --scheduling-policy priority, lower first
    normalize: Optional[bool] = None

    def chat_fields(self) -> Optional[ChatTemplateFields]:
        """The chat form as the chat endpoint's template fields; None for `input`. Exactly one
        of the two is given (a ParamError naming `input` otherwise)."""
        if (self.input is None) == (self.messages is None):
            raise ParamError("input", "give either input or messages (a conversation to embed), not both or none.")
        if self.messages is None:
            return None
        return ChatTemplateFields(messages=self.messages, chat_template=self.chat_template,
                                  chat_template_kwargs=self.chat_template_kwargs,
                                  add_generation_prompt=self.add_generation_prompt,
                                  continue_final_message=self.continue_final_message)


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
    priority: int = 0  # vLLM's: under --scheduling-policy priority, lower first


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


class ScoreRequest(OpenAIBaseModel):
    model: Optional[str] = None
    text_1: Union[Text, list[Text]]
    text_2: Union[Text, list[Text]]
    truncate_prompt_tokens: Optional[int] = None
    priority: int = 0  # vLLM's: under --scheduling-policy priority, lower first


class ScoreData(OpenAIBaseModel):
    object: Literal["score"] = "score"
    index: int
    score: float


class ScoreResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("score"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ScoreData]
    usage: UsageInfo


class RerankRequest(OpenAIBaseModel):
    model: Optional[str] = None
    query: Text
    documents: list[Text]
    top_n: Optional[int] = None
    truncate_prompt_tokens: Optional[int] = None
    priority: int = 0  # vLLM's: under --scheduling-policy priority, lower first


class RerankDocument(OpenAIBaseModel):
    text: str


class RerankResult(OpenAIBaseModel):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankUsage(OpenAIBaseModel):
    total_tokens: int


class RerankResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("rerank"))
    model: str
    usage: RerankUsage
    results: list[RerankResult]  # best first
