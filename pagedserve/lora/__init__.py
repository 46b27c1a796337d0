"""LoRA adapters (PEFT format) served on top of the base model, several per batch."""
