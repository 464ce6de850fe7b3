"""LLM LoRA training: local Transformers causal LMs, instruction/chat data, PEFT adapters."""
