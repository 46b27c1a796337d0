"""POST /tokenize and /detokenize (vLLM's extension): the server's own tokenizer and chat
template, so clients can count tokens exactly as the engine will."""

from __future__ import annotations

from pagedserve.entrypoints.openai.protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest,
                                                    TokenizeRequest, TokenizeResponse)
from pagedserve.entrypoints.openai.serving_engine import OpenAIServing


class OpenAIServingTokenization(OpenAIServing):
    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.model_name(req.model)
        tok = self.llm.tokenizer
        if isinstance(req, TokenizeChatRequest):
            text, ids, images = await self.render_chat(req, add_special_tokens=req.add_special_tokens)
            if images:  # counted as the engine will see them: each placeholder expanded
                prompt = {"prompt_token_ids": ids, "prompt": text, "multi_modal_data": {"image": images}}
                ids = (await self.llm.run_tokenizer(self.llm.engine.process_inputs, prompt))[1]
        else:
            ids = await self.llm.run_tokenizer(tok.encode, req.prompt, add_special_tokens=req.add_special_tokens)
        strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids, token_strs=strs)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.model_name(req.model)
        vocab = self.llm.engine.config.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is out of vocabulary (vocab size {vocab}).")
        return DetokenizeResponse(prompt=await self.llm.run_tokenizer(self.llm.tokenizer.decode, req.tokens))
