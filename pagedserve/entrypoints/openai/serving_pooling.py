"""POST /v1/embeddings (an embedding model) and /classify (a sequence classifier): one result
per input, from a pooling model (runner "pooling")."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import numpy as np

from pagedserve.entrypoints.openai.protocol import UsageInfo, random_id
from pagedserve.entrypoints.openai.protocol_pooling import (ClassificationData, ClassificationRequest,
                                                            ClassificationResponse, EmbeddingData, EmbeddingRequest,
                                                            EmbeddingResponse)
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
    async def _pool(self, req: Any, params: PoolingParams, prefix: str) -> tuple[str, str, list]:
        """(model name, request id, one engine output per input), all inputs or none."""
        model = self.model_name(req.model)
        task = self.llm.engine.config.pooling_task
        if task != params.task:
            api, needs = _WHAT[params.task]
            raise OpenAIError(400, f"The model `{model}` does not support {api}: serve {needs}.", "BadRequestError",
                              "model")
        prompts = _inputs(req.input)
        queue = self.llm.max_waiting_requests
        if queue is not None and len(prompts) > queue:  # could never be queued at once
            raise ParamError("input", f"a request may carry at most {queue} inputs (--max-waiting-requests), "
                             f"got {len(prompts)}.")
        for p in prompts:
            if isinstance(p, str):
                self.limits.check_prompt_chars(p, "input", params.truncate_prompt_tokens is not None)
        reservation = self.llm.reserve(len(prompts))
        request_id = random_id(prefix)
        arrival = time.monotonic()
        try:
            # Every input tokenized and checked before any is queued: a bad one fails the call.
            tokens = [await self.llm.preprocess(p, params) for p in prompts]
            tasks = [asyncio.ensure_future(self.llm.encode(t, params, f"{request_id}-{i}", arrival_time=arrival,
                                                           reservation=reservation)) for i, t in enumerate(tokens)]
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
        model, request_id, outs = await self._pool(req, params, "embd")
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


def _usage(outs: list) -> UsageInfo:
    n = sum(len(o.prompt_token_ids) for o in outs)
    return UsageInfo(prompt_tokens=n, total_tokens=n)
