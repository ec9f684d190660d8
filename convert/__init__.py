"""Converters from Hugging Face checkpoints and δ-mem adapters to GGUF (installed as pydeltamem.convert)."""
