"""POST /v1/embeddings (an embedding model), /classify (a sequence classifier), /score and
/rerank (a cross-encoder, or an embedding model's cosine similarity; pagedserve/scoring.py):
results from a pooling model (runner "pooling")."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any, Optional

import numpy as np

from pagedserve.entrypoints.openai.protocol import UsageInfo, random_id
from pagedserve import scoring
from pagedserve.entrypoints.openai.protocol_pooling import (ClassificationData, ClassificationRequest,
                                                            ClassificationResponse, EmbeddingData, EmbeddingRequest,
                                                            EmbeddingResponse, RerankDocument, RerankRequest,
                                                            RerankResponse, RerankResult, RerankUsage, ScoreData,
                                                            ScoreRequest, ScoreResponse)
from pagedserve.entrypoints.openai.serving_engine import OpenAIError, OpenAIServing
from pagedserve.errors import ParamError
from pagedserve.pooling_params import PoolingParams

_WHAT = {"embed": ("the Embeddings API", "an embedding model"), "classify": ("classification", "a sequence classifier")}


def _inputs(inp: Any) -> list:
    """OpenAI's four input forms -> prompts for the engine."""
    if isinstance(inp, str):
        return [inp]
    if not inp:
        raise ParamError("input", "input must not be empty.")
    if all(isinstance(x, int) for x in inp):
        return [{"prompt_token_ids": list(inp)}]
    return [x if isinstance(x, str) else {"prompt_token_ids": list(x)} for x in inp]


def _encode(vector: list[float], fmt: str):
    if fmt == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


class OpenAIServingPooling(OpenAIServing):
    async def _pool(self, req: Any, params: PoolingParams, prefix: str, prompts: Optional[list] = None
                    ) -> tuple[str, str, list]:
        """(model name, request id, one engine output per input: `prompts`, else the
        request's `input`), all inputs or none."""
        model = self.model_name(req.model)
        task = self.llm.engine.config.pooling_task
        if task != params.task:
            api, needs = _WHAT[params.task]
            raise OpenAIError(400, f"The model `{model}` does not support {api}: serve {needs}.", "BadRequestError",
                              "model")
        prompts = _inputs(req.input) if prompts is None else prompts
        self.check_prompts(prompts, "input", params.truncate_prompt_tokens is not None)
        self.llm.engine.check_priority(req.priority)
        reservation = self.llm.reserve(len(prompts))
        request_id = random_id(prefix)
        arrival = time.monotonic()
        try:
            # Every input tokenized and checked before any is queued: a bad one fails the call.
            tokens = [await self.llm.preprocess(p, params) for p in prompts]
            tasks = [asyncio.ensure_future(self.llm.encode(t, params, f"{request_id}-{i}", arrival_time=arrival,
                                                           reservation=reservation, priority=req.priority))
                     for i, t in enumerate(tokens)]
            try:
                outs = await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:  # one failed (or the client left): the others are aborted, not left running
                    t.cancel()
                raise
        finally:
            reservation.release()
        return model, request_id, outs

    async def embed(self, req: EmbeddingRequest) -> EmbeddingResponse:
        params = PoolingParams(dimensions=req.dimensions, normalize=req.normalize,
                               truncate_prompt_tokens=req.truncate_prompt_tokens, task="embed")
        chat, prompts = req.chat_fields(), None
        if chat is not None:  # vLLM's chat form: the conversation rendered, then embedded
            text, ids, images = await self.render_chat(chat, add_special_tokens=req.add_special_tokens,
                                                       truncating=req.truncate_prompt_tokens is not None)
            if images:
                raise ParamError("messages", "embedding a conversation takes text only, not images.")
            prompts = [{"prompt_token_ids": ids, "prompt": text}]
        model, request_id, outs = await self._pool(req, params, "embd", prompts)
        data = [EmbeddingData(index=i, embedding=_encode(o.outputs.embedding, req.encoding_format))
                for i, o in enumerate(outs)]
        return EmbeddingResponse(id=request_id, model=model, data=data, usage=_usage(outs))

    async def classify(self, req: ClassificationRequest) -> ClassificationResponse:
        params = PoolingParams(truncate_prompt_tokens=req.truncate_prompt_tokens, task="classify")
        model, request_id, outs = await self._pool(req, params, "classify")
        labels = getattr(self.llm.engine.config.hf_config, "id2label", None) or {}
        data = []
        for i, o in enumerate(outs):
            probs = o.outputs.probs
            best = int(np.argmax(probs))
            data.append(ClassificationData(index=i, label=labels.get(best, labels.get(str(best))), probs=probs,
                                           num_classes=len(probs)))
        return ClassificationResponse(id=request_id, model=model, data=data, usage=_usage(outs))


    async def _scores(self, req: Any, texts: list[tuple[str, str]]) -> tuple[str, list[float], int]:
        """(model name, one score per pair, prompt tokens used)."""
        kind = scoring.check_scorer(self.llm.engine.config)
        if kind == "cross":
            tok, types = self.llm.tokenizer, scoring.uses_token_types(self.llm.engine.config)
            prompts = [await self.llm.run_tokenizer(scoring.pair_prompt, tok, a, b, types) for a, b in texts]
            params = PoolingParams(truncate_prompt_tokens=req.truncate_prompt_tokens, task="classify")
            model, _, outs = await self._pool(req, params, "score", prompts)
            return model, [o.outputs.probs[0] for o in outs], _usage(outs).prompt_tokens
        unique = list(dict.fromkeys(t for pair in texts for t in pair))
        params = PoolingParams(truncate_prompt_tokens=req.truncate_prompt_tokens, task="embed")
        model, _, outs = await self._pool(req, params, "score", unique)
        vecs = {t: o.outputs.embedding for t, o in zip(unique, outs)}
        return model, [scoring.cosine(vecs[a], vecs[b]) for a, b in texts], _usage(outs).prompt_tokens

    async def score(self, req: ScoreRequest) -> ScoreResponse:
        texts = scoring.pairs(req.text_1, req.text_2)
        model, scores, n = await self._scores(req, texts)
        return ScoreResponse(model=model, data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)],
                             usage=UsageInfo(prompt_tokens=n, total_tokens=n))

    async def rerank(self, req: RerankRequest) -> RerankResponse:
        if req.top_n is not None and req.top_n < 1:
            raise ParamError("top_n", f"top_n must be a positive integer, got {req.top_n}.")
        if not req.documents:
            raise ParamError("documents", "documents must not be empty.")
        model, scores, n = await self._scores(req, scoring.pairs(req.query, req.documents))
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: req.top_n]
        results = [RerankResult(index=i, document=RerankDocument(text=req.documents[i]), relevance_score=scores[i])
                   for i in order]
        return RerankResponse(model=model, usage=RerankUsage(total_tokens=n), results=results)


def _usage(outs: list) -> UsageInfo:
    n = sum(len(o.prompt_token_ids) for o in outs)
    return UsageInfo(prompt_tokens=n, total_tokens=n)
