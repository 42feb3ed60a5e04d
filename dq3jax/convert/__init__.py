"""Conversion to GGUF: HF checkpoint or params pytree -> deepseek2 GGUF (plain or quantized by a recipe)."""
