"""pydeltamem: local LLM inference on ggml with δ-mem online associative memory."""
import os as _os

from . import _core
from .model import Context, Model

__all__ = ["Model", "Context", "get_include", "get_lib_dir", "system_info"]
__version__ = "0.1.0"


def get_lib_dir() -> str:
    """Folder of libdeltamem.so, the engine behind the C API."""
    return _os.path.dirname(_core.__file__)


def get_include() -> str:
    """Folder of deltamem.h, the C API (for C programs that link libdeltamem)."""
    return _os.path.join(get_lib_dir(), "include")


def system_info() -> str:
    """The CPU features and options the engine's ggml was built with ("AVX2 = 1 | ... | REPACK = 1");
    a native build (bench/build_native_ggml.sh) adds AVX512*, OPENMP and LLAMAFILE where they apply."""
    return _core.system_info()
