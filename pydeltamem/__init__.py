"""pydeltamem: local LLM inference on ggml with δ-mem online associative memory."""
from .model import Context, Model

__all__ = ["Model", "Context"]
__version__ = "0.1.0"
