"""POST /v1/embeddings: one vector per input, from a pooling model (runner "pooling")."""

from __future__ import annotations

import asyncio
import base64
import time

import numpy as np

from pagedserve.entrypoints.openai.protocol import UsageInfo, random_id
from pagedserve.entrypoints.openai.protocol_embedding import EmbeddingData, EmbeddingRequest, EmbeddingResponse
from pagedserve.entrypoints.openai.serving_engine import OpenAIError, OpenAIServing
from pagedserve.errors import ParamError
from pagedserve.pooling_params import PoolingParams


def _inputs(inp) -> list:
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


class OpenAIServingEmbedding(OpenAIServing):
    async def create(self, req: EmbeddingRequest) -> EmbeddingResponse:
        model = self.model_name(req.model)
        if self.llm.engine.config.runner != "pooling":
            raise OpenAIError(400, f"The model `{model}` does not support the Embeddings API: it generates text "
                              "(serve an embedding model, or start with --runner pooling).", "BadRequestError",
                              "model")
        params = PoolingParams(dimensions=req.dimensions, normalize=req.normalize,
                               truncate_prompt_tokens=req.truncate_prompt_tokens)
        prompts = _inputs(req.input)
        queue = self.llm.max_waiting_requests
        if queue is not None and len(prompts) > queue:  # could never be queued at once
            raise ParamError("input", f"a request may carry at most {queue} inputs (--max-waiting-requests), "
                             f"got {len(prompts)}.")
        for p in prompts:
            if isinstance(p, str):
                self.limits.check_prompt_chars(p, "input", params.truncate_prompt_tokens is not None)
        reservation = self.llm.reserve(len(prompts))
        request_id = random_id("embd")
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
        data = [EmbeddingData(index=i, embedding=_encode(o.outputs.embedding, req.encoding_format))
                for i, o in enumerate(outs)]
        n = sum(len(o.prompt_token_ids) for o in outs)
        return EmbeddingResponse(id=request_id, model=model, data=data, usage=UsageInfo(prompt_tokens=n, total_tokens=n))
