"""vLLM's LoRARequest: which adapter a request runs with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """lora_name: the adapter's name (the server's `model` field); lora_int_id: a positive
    integer unique per adapter (its identity for the adapter cache and the prefix cache);
    lora_path: a local PEFT adapter directory (adapter_config.json, adapter_model.safetensors)."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_request.lora_int_id must be a positive integer, got {self.lora_int_id!r}.")
        if not self.lora_name or not isinstance(self.lora_name, str):
            raise ValueError("lora_request.lora_name must be a non-empty string.")
        if not self.lora_path or not isinstance(self.lora_path, str):
            raise ValueError("lora_request.lora_path must name a local adapter directory.")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id
