"""The conversion itself, and the `deltamem convert-adapter` command line."""
from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path

from .backbone import ROPE_PERMUTED_ARCHS, SUPPORTED_ARCHS, Backbone, check_arch, load_backbone
from .config import HEAD_KINDS, AdapterConfig, parse_config
from .folding import OUTTYPES, layer_output_tensors, resolve_outtype
from .source import collect_layer, group_by_layer, read_adapter_dir
from .writer import adapter_metadata, fingerprint, write_adapter_gguf


def resolve_target_layers(cfg: AdapterConfig, in_file: set[int], block_count: int | None) -> tuple[int, ...]:
    """The layers the adapter wraps, as the official attach loop picks them: every layer (target_layers
    empty), or the listed ones that the model has. Each needs its weights, and the file holds no others."""
    if cfg.target_layers is None:
        targets = list(range(block_count if block_count is not None else max(in_file) + 1))
    else:
        targets = [i for i in cfg.target_layers if block_count is None or 0 <= i < block_count]
        absent = sorted(set(cfg.target_layers) - set(targets))
        if absent:   # the official code finds no such module and wraps nothing there
            warnings.warn(f"config key 'target_layers' lists layer(s) {absent} the base model does not have "
                          f"({block_count} layers); they are ignored", stacklevel=3)
        if not targets:
            raise ValueError(f"config key 'target_layers' = {list(cfg.target_layers)}: none of these layers exists "
                             f"in the base model ({block_count} layers)")
    missing = [i for i in targets if i not in in_file]
    if missing:
        which = "every layer (target_layers empty)" if cfg.target_layers is None else "these layers"
        raise ValueError(f"the adapter targets {which} but holds no weights for layer(s) {missing}")
    extra = sorted(in_file - set(targets))
    if extra:
        why = (f"the base model has {block_count} layers" if cfg.target_layers is None
               else "target_layers does not select them")
        raise ValueError(f"the adapter holds weights for layer(s) {extra}, but {why}")
    return tuple(targets)


def _validate_against_backbone(widths: dict[str, int | None], backbone: Backbone, arch_arg: str | None) -> None:
    where = f"base {backbone.source}"
    if arch_arg is not None and arch_arg != backbone.arch:
        raise ValueError(f"--arch {arch_arg} contradicts the base model's architecture {backbone.arch} ({where})")
    for head in HEAD_KINDS:
        if widths[head] is not None and widths[head] != backbone.widths[head]:
            what = "hidden size" if head == "o" else f"{head} projection width"
            raise ValueError(
                f"adapter {what} is {widths[head]} but the base model's is {backbone.widths[head]} ({where}); "
                "was the adapter trained for another model?"
            )


def _backbone(base, pack) -> Backbone | None:
    if pack is not None and not Path(pack).is_file():
        raise ValueError(f"--pack needs a model GGUF file, got {pack}")
    backbones = [load_backbone(p) for p in (base, pack) if p is not None]
    if len(backbones) == 2 and dataclasses.replace(backbones[0], source="") != dataclasses.replace(backbones[1], source=""):
        raise ValueError(f"--base {base} and --pack {pack} describe different models")
    return backbones[0] if backbones else None


def convert_adapter(
    adapter_dir: str | Path,
    out_path: str | Path,
    base: str | Path | None = None,
    outtype: str = "auto",
    pack: str | Path | None = None,
    arch: str | None = None,
) -> Path:
    """Convert ADAPTER_DIR to a GGUF adapter at out_path (or, with `pack`, a model GGUF that
    also carries the adapter). Returns the output path. Raises ValueError/FileNotFoundError
    with a clear message on bad input; warns (UserWarning) on a no-op adapter (no delta heads)."""
    raw_config, raw_tensors = read_adapter_dir(adapter_dir)
    outtype = resolve_outtype(outtype, raw_tensors)
    by_layer = group_by_layer(raw_tensors)
    cfg = parse_config(raw_config)

    backbone = _backbone(base, pack)
    if arch is not None:
        check_arch(arch, "--arch")
    target_arch = backbone.arch if backbone else arch
    if target_arch is None:
        raise ValueError("the backbone architecture is unknown: pass --base MODEL.gguf|HF_DIR (recommended) or --arch")
    if target_arch in ROPE_PERMUTED_ARCHS and backbone is None and any(h in cfg.delta_heads for h in "qk"):
        raise ValueError(
            f"a {target_arch} backbone needs W_Δq/W_Δk rows permuted per attention head: pass --base "
            "so the head counts are known"
        )
    every_layer = cfg.target_layers is None
    cfg = dataclasses.replace(
        cfg, target_layers=resolve_target_layers(cfg, set(by_layer), backbone.block_count if backbone else None))

    # Widths come from the adapter's own tensors first, so a mismatch with --base is
    # reported as such; widths the adapter does not pin down are then taken from the base.
    widths: dict[str, int | None] = {h: None for h in HEAD_KINDS}
    layers = {i: collect_layer(i, by_layer[i], cfg, widths) for i in cfg.target_layers}
    if backbone is not None:
        _validate_against_backbone(widths, backbone, arch)
        widths = dict(backbone.widths)
        block_count = backbone.block_count
    else:   # all layers: the file has them all; else unknown, and the runtime skips that check
        block_count = len(cfg.target_layers) if every_layer else 0

    tensors = [t for i in cfg.target_layers for t in layer_output_tensors(i, layers[i], cfg, outtype, backbone, target_arch)]
    metadata = adapter_metadata(cfg, widths, block_count, target_arch, fingerprint(cfg, layers))
    out_path = Path(out_path)
    write_adapter_gguf(out_path, target_arch, metadata, tensors, Path(adapter_dir).resolve().name, pack)
    return out_path


def _run_cli(args: argparse.Namespace) -> int:
    out = convert_adapter(args.adapter_dir, args.outfile, base=args.base, outtype=args.outtype, pack=args.pack, arch=args.arch)
    print(f"wrote {out}")
    return 0


def register_cli(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert-adapter",
        help="convert a δ-mem adapter (delta_mem_config.json + .pt/.safetensors) to GGUF",
        description="Convert a trained δ-mem adapter to a GGUF adapter (format: docs/adapter-format.md).",
    )
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="folder with delta_mem_config.json and delta_mem_adapter.pt|.safetensors")
    parser.add_argument("-o", "--outfile", required=True, metavar="OUT.gguf", help="output file")
    parser.add_argument("--base", metavar="MODEL.gguf|HF_DIR", help="backbone to validate against (and to take the architecture from)")
    parser.add_argument("--outtype", choices=OUTTYPES, default="auto",
                        help="dtype of the weight matrices: auto (default) = f16 for a 16-bit (bf16/f16) checkpoint, "
                        "f32 for a 32-bit one")
    parser.add_argument("--pack", metavar="MODEL.gguf", help="write one GGUF holding this model and the adapter")
    parser.add_argument("--arch", choices=SUPPORTED_ARCHS, help="backbone architecture, when no --base is given")
    parser.set_defaults(func=_run_cli)
    return parser
