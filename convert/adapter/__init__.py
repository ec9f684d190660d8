"""Convert a trained δ-mem adapter (the official release format) to a GGUF adapter file.

    deltamem convert-adapter ADAPTER_DIR -o OUT.gguf [--base MODEL.gguf|HF_DIR]
                             [--outtype auto|f32|f16] [--pack MODEL.gguf] [--arch ARCH]

Input: `delta_mem_config.json` (every key the official configuration dataclass writes) plus
`delta_mem_adapter.pt` (read without torch, through a restricted unpickler) or
`delta_mem_adapter.safetensors`. Output: a GGUF whose keys and tensors are specified in
docs/adapter-format.md — read that first; this package is its implementation:

- config:   the configuration keys, their official defaults, what is refused and why;
- source:   reading the folder and checking each layer's tensors against the configuration;
- backbone: the model the adapter is for (--base / --pack), for validation and q/k row order;
- folding:  alpha/rank and the learned scale folded into W_Δ, llama-style q/k rows permuted;
- writer:   the fingerprint, the deltamem.* keys, the GGUF file (alone or packed);
- main:     the conversion and its command line.
"""
from .backbone import SUPPORTED_ARCHS, Backbone, load_backbone
from .config import AdapterConfig, parse_config
from .folding import OUTTYPES
from .main import convert_adapter, register_cli

__all__ = ["OUTTYPES", "SUPPORTED_ARCHS", "AdapterConfig", "Backbone", "convert_adapter", "load_backbone",
           "parse_config", "register_cli"]
