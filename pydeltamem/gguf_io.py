"""GGUF output shared by the model converter, the adapter converter and the quantizer."""
from __future__ import annotations

import os
from typing import Callable, Container

from .atomic import replacing


def copy_metadata(writer, reader, skip: Container[str] = ()) -> None:
    """Copies every key of a gguf-py GGUFReader into a GGUFWriter, but the reader's pseudo-keys
    (GGUF.*) and the keys in `skip`; the writer takes over the file's alignment."""
    from gguf import GGUFValueType

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        main_type = field.types[0]
        if main_type == GGUFValueType.ARRAY:
            if len(field.types) != 2:
                raise ValueError(f"metadata key {key!r}: nested arrays are not supported")
            writer.add_key_value(key, field.contents(), main_type, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), main_type)
        if key == "general.alignment":
            writer.data_alignment = int(field.contents())


def write_gguf(writer, path: str | os.PathLike, write_tensors: Callable[[], None]) -> None:
    """Writes a gguf-py GGUFWriter's header, metadata and tensor infos to path, then lets
    write_tensors() stream the tensor data (writer.write_tensor_data), atomically."""
    with replacing(path) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            write_tensors()
        finally:
            writer.close()
