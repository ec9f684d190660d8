"""pydeltamem: local LLM inference on ggml with δ-mem online associative memory."""
import glob as _glob
import os as _os

try:
    from . import _core
except ImportError:
    _here = _os.path.dirname(_os.path.abspath(__file__))
    if not _glob.glob(_os.path.join(_here, "_core*")):
        raise ImportError(
            f"pydeltamem's compiled engine (_core) is not in {_here}: this is the package's source tree, "
            "which Python imports instead of the installed package when run from the checkout's root. "
            "Run Python from another folder to use the installed package, or build the engine in place "
            "with `pip install -e .`") from None
    raise
from .model import Context, Model, decode_batch
from .sampling import SamplingParams
from .scheduler import BatchRequest, BatchScheduler

__all__ = ["Model", "Context", "SamplingParams", "BatchScheduler", "BatchRequest", "decode_batch", "devices", "get_include", "get_lib_dir", "system_info"]
__version__ = "0.1.0"


def get_lib_dir() -> str:
    """Folder of libdeltamem.so, the engine behind the C API."""
    return _os.path.dirname(_core.__file__)


def get_include() -> str:
    """Folder of deltamem.h, the C API (for C programs that link libdeltamem)."""
    return _os.path.join(get_lib_dir(), "include")


def system_info() -> str:
    """The CPU features and options the engine's ggml was built with ("AVX2 = 1 | ... | REPACK = 1");
    a native build (scripts/build_ggml.sh VENV --native) adds AVX512*, OPENMP and LLAMAFILE where they apply."""
    return _core.system_info()


def devices(rpc_servers: "str | list[str] | None" = None) -> list[dict]:
    """The devices this engine can run on: dicts of name, description, type ("cpu", "gpu", "igpu",
    "accel"), free and total (bytes). rpc_servers ("host:port" strings, or one comma-separated
    string) adds the devices of those `deltamem rpc-server`s first (they stay added)."""
    from .model import _rpc_servers

    servers = _rpc_servers(rpc_servers)
    if servers:
        _core.rpc_add_servers(servers)
    return _core.devices()
