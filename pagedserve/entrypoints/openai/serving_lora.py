"""vLLM's runtime LoRA endpoints, POST /v1/load_lora_adapter and /v1/unload_lora_adapter,
served only when the operator allows it (PAGEDSERVE_ALLOW_RUNTIME_LORA_UPDATING=1, or vLLM's
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True): they let any client with the API key make the server
read a directory.

The served adapters are one name -> LoRARequest map shared with every endpoint. Loading reads
and checks the adapter off the event loop (a bad one is a 400 and is not served), then serves
it under a new id (ids are never reused, so a name loaded again from another path is another
adapter to the engine). Unloading stops new requests from naming it; requests already running
finish with it, and the engine drops it from its cache like any unused adapter."""

from __future__ import annotations

import asyncio
import os
from typing import Optional, Sequence

from pydantic import BaseModel, ConfigDict

from pagedserve.engine.async_engine import AsyncLLM
from pagedserve.entrypoints.openai.serving_engine import OpenAIError
from pagedserve.lora.request import LoRARequest

ENV_FLAGS = ("PAGEDSERVE_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")


def runtime_lora_allowed() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true") for v in ENV_FLAGS)


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # vLLM: replace an adapter already served under this name


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_int_id: Optional[int] = None


def _bad(message: str, param: str) -> OpenAIError:
    return OpenAIError(400, message, "BadRequestError", param)


class OpenAIServingLoRA:
    def __init__(self, async_llm: AsyncLLM, served_model_names: Sequence[str], loras: dict[str, LoRARequest]) -> None:
        self.llm, self.names, self.loras = async_llm, list(served_model_names), loras
        self._next_id = max((lora.lora_int_id for lora in loras.values()), default=0) + 1
        self._lock = asyncio.Lock()

    async def load(self, req: LoadLoRAAdapterRequest) -> str:
        config = self.llm.engine.config
        if not config.enable_lora:
            raise _bad("LoRA adapters need a server started with --enable-lora.", "lora_name")
        if not req.lora_name or not req.lora_path:
            raise _bad("Both 'lora_name' and 'lora_path' must be provided.", "lora_name" if not req.lora_name
                       else "lora_path")
        if req.lora_name in self.names:
            raise _bad(f"The lora adapter name '{req.lora_name}' is the served model's name.", "lora_name")
        async with self._lock:  # one load at a time: no two adapters under one name
            if req.lora_name in self.loras and not req.load_inplace:
                raise _bad(f"The lora adapter '{req.lora_name}' has already been loaded.", "lora_name")
            lora = LoRARequest(req.lora_name, self._next_id, req.lora_path)
            await self._check(lora)
            self._next_id += 1
            self.loras[lora.lora_name] = lora
        return f"Success: LoRA adapter '{req.lora_name}' added successfully."

    async def unload(self, req: UnloadLoRAAdapterRequest) -> str:
        async with self._lock:
            lora = self.loras.get(req.lora_name)
            if lora is None or (req.lora_int_id is not None and req.lora_int_id != lora.lora_int_id):
                raise OpenAIError(404, f"The lora adapter '{req.lora_name}' cannot be found.", "NotFoundError",
                                  "lora_name")
            del self.loras[req.lora_name]
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."

    async def _check(self, lora: LoRARequest) -> None:
        """Read and check the adapter against the model, off the event loop and off the
        engine's own adapter cache (which only the engine thread touches)."""
        from pagedserve.lora.adapter import load_adapter

        runner = self.llm.engine.runner
        config = self.llm.engine.config
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, lambda: load_adapter(lora.lora_int_id, lora.lora_name, lora.lora_path,
                                                                  runner.model, config.max_lora_rank, config.dtype))
        except (ValueError, OSError) as e:
            raise _bad(f"Loading the lora adapter '{lora.lora_name}' failed: {e}", "lora_path") from None
