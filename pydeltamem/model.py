"""Model and Context: the Pythonic layer over the native core (pydeltamem._core)."""
from __future__ import annotations

import json
import os
import threading
import warnings
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from . import _core
from . import atomic as _atomic
from . import completion
from . import memfile as _memfile
from .chat_template import ChatFormat, model_chat_template, thinking_override
from .sampling import SamplingParams, sampling_params
from .session import ChatSession

if TYPE_CHECKING:
    from .completion import OnPiece

_LOGITS = {"none": _core.LOGITS_NONE, "last": _core.LOGITS_LAST, "all": _core.LOGITS_ALL}
_KV_TYPES = {"f16": _core.KV_F16, "f32": _core.KV_F32}


def _kv_type_code(kv_type: str) -> int:
    try:
        return _KV_TYPES[kv_type]
    except KeyError:
        raise ValueError(f"kv_type must be one of {sorted(_KV_TYPES)}, got {kv_type!r}") from None


def _hardware_threads() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


def _native_n_threads(n_threads: int | None, *, warn: bool = False) -> int:
    """n_threads for the native context (0: the physical cores, for None); ValueError outside
    [1, MAX_THREADS], and with warn, a RuntimeWarning above the hardware threads: each pass waits
    for every worker, so oversubscribed cores make decoding many times slower."""
    if n_threads is None:
        return 0
    if not isinstance(n_threads, int) or isinstance(n_threads, bool):
        raise ValueError(f"n_threads must be an int or None, got {n_threads!r}")
    if not 1 <= n_threads <= _core.MAX_THREADS:
        raise ValueError(f"n_threads must be in [1, {_core.MAX_THREADS}] (or None: the physical cores), got {n_threads}")
    if warn and n_threads > _hardware_threads():
        warnings.warn(f"n_threads={n_threads} is more than the {_hardware_threads()} hardware threads this process "
                      "may use: decoding will be much slower", RuntimeWarning, stacklevel=4)
    return n_threads


def _metadata_value(type_name: str, raw: bytes) -> Any:
    text = raw.decode("utf-8", errors="replace")
    if type_name == "str":
        return text
    if type_name == "bool":
        return text == "true"
    if type_name[0] in "iu":   # i8 ... u64
        return int(text)
    if type_name[0] == "f":    # f32, f64
        return float(text)
    if text.startswith("[") and ";" not in text:
        return json.loads(text)
    return text   # a long array, summarised as "[type; n]"


def _rpc_servers(servers: str | Sequence[str] | None) -> str:
    """The C API's "host:port,host:port" form of rpc_servers."""
    if servers is None:
        return ""
    if isinstance(servers, str):
        return servers
    items = list(servers)
    for s in items:
        if not isinstance(s, str) or not s or "," in s:
            raise ValueError(f"rpc_servers entries must be 'host:port' strings, got {s!r}")
    return ",".join(items)


def _tensor_split(split: Sequence[float] | None) -> list[float]:
    if split is None:
        return []
    values = [float(x) for x in split]
    if not values or any(not (v >= 0.0) or v == float("inf") for v in values) or sum(values) <= 0.0:
        raise ValueError(f"tensor_split must be non-negative finite shares with a positive sum, got {list(split)!r}")
    return values


class Model:
    """A GGUF model loaded into memory. Weights are shared by every context made from it.

    >>> with Model("model.gguf") as m:
    ...     ctx = m.context()
    ...     logits = ctx.decode(m.tokenize("Hello"))
    """

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 4096, n_batch: int = 512,
                 n_threads: int | None = None, kv_type: str = "f16", use_mmap: bool = True,
                 adapter: str | os.PathLike | None = None, use_repack: bool = True, poll: int = 50,
                 n_gpu_layers: int = 0, main_gpu: int = 0, tensor_split: Sequence[float] | None = None,
                 rpc_servers: str | Sequence[str] | None = None):
        """n_gpu_layers, main_gpu, tensor_split and rpc_servers place layers on devices, as in
        llama-cpp-python: n_gpu_layers=-1 offloads every layer and the output, k the last k layers.
        The offload devices are this machine's GPUs, then those of rpc_servers ("host:port" strings
        of `deltamem rpc-server`s, or one comma-separated string), in pydeltamem.devices()'s order;
        tensor_split spreads the offloaded layers over them in those proportions, and without it
        they all go to device main_gpu."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"model file not found: {path!r}")
        if n_ctx <= 0 or n_batch <= 0:
            raise ValueError(f"n_ctx and n_batch must be positive (got n_ctx={n_ctx}, n_batch={n_batch})")
        _kv_type_code(kv_type)
        _native_n_threads(n_threads)
        self.model_path = path
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_threads = n_threads
        self.kv_type = kv_type
        self.poll = poll
        if adapter is not None and not os.path.isfile(os.fspath(adapter)):
            raise ValueError(f"adapter file not found: {os.fspath(adapter)!r}")
        self._native = _core.Model(path, use_mmap, None if adapter is None else os.fspath(adapter), use_repack,
                                   n_gpu_layers, main_gpu, _tensor_split(tensor_split), _rpc_servers(rpc_servers))
        info = self._native.adapter_info
        self._adapter: dict[str, Any] | None = None if info is None else json.loads(info)
        if self._adapter is not None and not self._adapter["delta_heads"]:
            warnings.warn(f"the δ-mem adapter of {self._adapter['source']} has no delta heads: its memory is kept "
                          "but corrects nothing, so the model behaves as the bare backbone", stacklevel=2)
        self._metadata: dict[str, Any] | None = None
        self._chat_format: ChatFormat | None = None
        self._shared: completion.GenerationSlot | None = None   # the context completions share, made on first use
        self._shared_lock = threading.Lock()

    def decode_batch(self, contexts: Sequence["Context"], tokens: Sequence[Sequence[int]], logits: str = "last",
                     **kwargs: Any) -> list[np.ndarray | None]:
        """pydeltamem.decode_batch over contexts of this model."""
        for i, c in enumerate(contexts):
            if getattr(c, "model", None) is not self:
                raise ValueError(f"decode_batch: context {i} belongs to another Model")
        return decode_batch(contexts, tokens, logits, **kwargs)

    def layer_device(self, layer: int) -> str:
        """Name of the device computing a layer ("CPU", "CUDA0", "RPC0", ...); layer n_layer is the output."""
        return self._native.layer_device(layer)

    # ---- lifecycle ----
    def close(self) -> None:
        """Frees the weights (contexts still open keep them until they close too)."""
        if self._shared is not None:
            self._shared.close()
            self._shared = None
        self._native.close()

    @property
    def closed(self) -> bool:
        return self._native.closed

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.arch}, {self.n_layer} layers, n_vocab={self.n_vocab}"
        return f"<pydeltamem.Model {os.path.basename(self.model_path)!r} ({state})>"

    # ---- facts about the model ----
    @property
    def arch(self) -> str:
        return self._native.arch

    @property
    def n_vocab(self) -> int:
        return self._native.n_vocab

    @property
    def n_ctx_train(self) -> int:
        return self._native.n_ctx_train

    @property
    def n_layer(self) -> int:
        return self._native.n_layer

    @property
    def n_embd(self) -> int:
        return self._native.n_embd

    @property
    def n_repacked(self) -> int:
        """Weights moved into faster layouts at load: ggml's CPU repack buffer (types with interleaved
        kernels) and, on CPUs with AMX, the engine's q4_0/q4_1/q8_0 kernel's own layout."""
        return self._native.n_repacked

    @property
    def adapter(self) -> dict[str, Any] | None:
        """The δ-mem adapter (rank, heads, modes, target layers, fingerprint), or None."""
        return None if self._adapter is None else dict(self._adapter)

    @property
    def memory_shape(self) -> tuple[int, int, int, int] | None:
        """Shape of a context's δ-mem memory: [target layers, state heads, rank, rank]; None without an adapter."""
        a = self._adapter
        if a is None:
            return None
        return (len(a["target_layers"]), a["num_state_heads"], a["rank"], a["rank"])

    @property
    def metadata(self) -> dict[str, Any]:
        """GGUF key/value metadata; long arrays (vocabularies, merges) are summarised as "[type; n]"."""
        if self._metadata is None:
            self._metadata = {key: _metadata_value(type_name, raw)
                              for key, type_name, raw in self._native.metadata_items()}
        return dict(self._metadata)

    # ---- contexts ----
    def context(self, *, n_ctx: int | None = None, n_batch: int | None = None,
                n_threads: int | None = None, kv_type: str | None = None, dmem_fused: bool = True,
                poll: int | None = None) -> "Context":
        """A new sequence with its own KV cache (and δ-mem state); defaults come from the Model.

        dmem_fused=False runs the δ-mem of CPU layers as the device formulation (ggml_gated_delta_net,
        what offloaded layers run) instead of the fused CPU kernels.
        poll (0..100, as llama.cpp's --poll) is how long the idle worker threads poll for the next
        pass before they sleep: 0 when idle cores matter more than wake-up latency. (Contexts taking
        turns in one process do not compete: a pass pauses the idle pool of the context before it.)
        """
        return Context(self, n_ctx=n_ctx or self.n_ctx, n_batch=n_batch or self.n_batch,
                       n_threads=n_threads if n_threads is not None else self.n_threads,
                       kv_type=kv_type or self.kv_type, dmem_fused=dmem_fused,
                       poll=self.poll if poll is None else poll)

    # ---- tokenizer ----
    def tokenize(self, text: str | bytes, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of text. add_special adds BOS/EOS as the GGUF asks; parse_special turns the
        text of control tokens (e.g. "<|im_start|>") into those tokens instead of plain text."""
        if isinstance(text, str):
            data = text.encode("utf-8")
        elif isinstance(text, (bytes, bytearray, memoryview)):
            data = bytes(text)
        else:   # bytes(5) would be five NUL bytes
            raise TypeError(f"text must be str or bytes, got {type(text).__name__}")
        return list(_core.tokenize(self._native, data, add_special, parse_special))

    def detokenize(self, ids: Iterable[int] | np.ndarray, special: bool = False) -> str:
        """Text of token ids; control tokens render as their text only when special is true."""
        data = _core.detokenize(self._native, _token_list(ids), special)
        return data.decode("utf-8", errors="replace")

    @property
    def token_bos(self) -> int | None:
        return _optional_token(_core.token_bos(self._native))

    @property
    def token_eos(self) -> int | None:
        return _optional_token(_core.token_eos(self._native))

    @property
    def token_eot(self) -> int | None:
        """End-of-turn token (e.g. <|im_end|>), None when the model has none."""
        return _optional_token(_core.token_eot(self._native))

    @property
    def end_of_turn_tokens(self) -> list[int]:
        """The tokens that end a chat reply (end of turn, end of sequence)."""
        return [t for t in (self.token_eot, self.token_eos) if t is not None]

    def token_text(self, token: int | None) -> str:
        """The text of a token, special tokens included ("" for None)."""
        return "" if token is None else self.detokenize([token], special=True)

    # ---- chat prompts ----
    @property
    def chat_format(self) -> ChatFormat:
        """How this model's conversations become prompts: the GGUF's chat template (ChatML, with a
        warning, when it has none) rendered as the δ-mem reference runtime renders it."""
        if self._chat_format is None:
            self._chat_format = ChatFormat(
                model_chat_template(self.metadata), bos_token=self.token_text(self.token_bos),
                eos_token=self.token_text(self.token_eos), enable_thinking=thinking_override(self.metadata),
                tokenize=lambda text, add_special: self.tokenize(text, add_special=add_special, parse_special=True))
        return self._chat_format

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation (see chat_format)."""
        return self.chat_format.render(messages, add_generation_prompt=add_generation_prompt)

    # ---- text generation (pydeltamem/completion.py) ----
    def create_completion(self, prompt: str | bytes | Sequence[int], max_tokens: int | None = 16,
                          temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                          min_p: float | None = None, typical_p: float | None = None,
                          repeat_penalty: float | None = None, frequency_penalty: float | None = None,
                          presence_penalty: float | None = None, stop: str | Sequence[str] | None = None,
                          seed: int | None = None, stream: bool = False,
                          logit_bias: dict[int, float] | None = None, write: bool = True,
                          sampling: SamplingParams | None = None):
        """Completes prompt (text or token ids); an OpenAI-shaped "text_completion" dict, or an iterator
        of chunks with stream=True. Stop strings end the text and are not part of it; max_tokens
        None or <= 0 generates until the context is full. Sampling: `sampling` (default
        SamplingParams(): temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, a random seed) with the
        fields named here changed (None keeps a field; seed=-1 asks for a random one); temperature 0
        is greedy. With a δ-mem adapter, write=False reads the memory without writing it."""
        tokens = self.prompt_tokens(prompt)
        params = sampling_params(sampling, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                 typical_p=typical_p, repeat_penalty=repeat_penalty,
                                 frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                                 seed=seed, logit_bias=logit_bias)
        return completion.create_completion(self, self._shared_slot(), tokens, max_tokens=max_tokens, stop=stop,
                                            sampling=params, stream=stream, write=write)

    __call__ = create_completion

    def prompt_tokens(self, prompt: str | bytes | Sequence[int]) -> list[int]:
        """The tokens a completion of prompt (text or token ids) starts from. Like llama-cpp-python:
        BOS as the model asks, and special tokens written in the prompt count."""
        if isinstance(prompt, (str, bytes)):
            return self.tokenize(prompt, add_special=True, parse_special=True)
        return _token_list(prompt)

    def create_chat_completion(self, messages: Sequence[dict[str, Any]], max_tokens: int | None = None,
                               temperature: float | None = None, top_p: float | None = None,
                               top_k: int | None = None, min_p: float | None = None,
                               typical_p: float | None = None, repeat_penalty: float | None = None,
                               frequency_penalty: float | None = None, presence_penalty: float | None = None,
                               stop: str | Sequence[str] | None = None, seed: int | None = None,
                               stream: bool = False, logit_bias: dict[int, float] | None = None,
                               write: bool = True, sampling: SamplingParams | None = None):
        """Answers a conversation rendered with the model's chat template; an OpenAI-shaped
        "chat.completion" dict, or "chat.completion.chunk"s with stream=True. Generation also ends at
        the end-of-turn token. A conversation that grows turn by turn decodes only its new tokens.
        Message content may be a string, None, or a list of OpenAI text parts. Sampling as in
        create_completion, from SamplingParams.chat() (temperature 0.2) by default. With a δ-mem
        adapter, write=False reads the memory without writing it; segment-mean adapters get the
        message and sentence ids of chat sessions."""
        params = sampling_params(sampling or SamplingParams.chat(), temperature=temperature, top_p=top_p,
                                 top_k=top_k, min_p=min_p, typical_p=typical_p, repeat_penalty=repeat_penalty,
                                 frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                                 seed=seed, logit_bias=logit_bias)
        return completion.create_chat_completion(self, self._shared_slot(), messages, max_tokens=max_tokens,
                                                 stop=stop, sampling=params, stream=stream, write=write)

    def _shared_slot(self) -> completion.GenerationSlot:
        with self._shared_lock:
            if self._shared is None:
                self._shared = completion.GenerationSlot(self.context())
            return self._shared

    # ---- chat sessions with memory ----
    def session(self, system: str | None = None, *, memory: str | os.PathLike | None = None,
                n_ctx: int | None = None, n_threads: int | None = None) -> "ChatSession":
        """A chat session with its own context; memory=PATH starts it from a saved δ-mem memory."""
        return ChatSession(self, system=system, memory=memory, n_ctx=n_ctx, n_threads=n_threads)

    def load_session(self, path: str | os.PathLike, *, n_ctx: int | None = None,
                     n_threads: int | None = None) -> "ChatSession":
        """A session saved with ChatSession.save (its messages and memory, and the KV cache when
        saved), or, given a folder, a snapshot of the δ-mem reference runtime
        (DeltaMemChatSession.save_snapshot: messages, memory and KV cache)."""
        if os.path.isdir(path):
            return ChatSession.from_reference_snapshot(self, path, n_ctx=n_ctx, n_threads=n_threads)
        return ChatSession.load(self, path, n_ctx=n_ctx, n_threads=n_threads)

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: str = "*Q4_K_M.gguf", cache_dir: str | os.PathLike | None = None,
                        *, adapter_repo: str | None = None, adapter_revision: str | None = None,
                        **kwargs: Any) -> "Model":
        """Downloads (or finds in the Hugging Face cache) the one GGUF of repo_id matching the glob
        filename, and loads it; kwargs go to Model(). adapter_repo names a δ-mem release on the Hub
        (e.g. "declare-lab/delta-mem_qwen3_4b-instruct"): it is downloaded, converted once for this
        model into the cache, checked against the model and loaded."""
        from .hub import adapter_gguf_from_hub, download_gguf

        path = download_gguf(repo_id, filename, cache_dir=cache_dir)
        if adapter_repo is not None:
            if kwargs.get("adapter") is not None:
                raise ValueError("pass either adapter (a GGUF file) or adapter_repo (a Hub release), not both")
            kwargs["adapter"] = adapter_gguf_from_hub(adapter_repo, path, cache_dir=cache_dir, revision=adapter_revision)
        return cls(path, **kwargs)


def decode_batch(contexts: Sequence["Context"], tokens: Sequence[Sequence[int]], logits: str = "last", *,
                 message_ids: Sequence[Sequence[int] | None] | None = None,
                 sentence_ids: Sequence[Sequence[int] | None] | None = None,
                 write: bool | Sequence[bool] = True) -> list[np.ndarray | None]:
    """Decodes tokens[i] into contexts[i] for every i in shared forward passes: each weight is read
    once for all the tokens; attention and δ-mem run per context, over its own KV cache and memory.
    Each context ends exactly as contexts[i].decode(tokens[i], ...) alone would leave it, and the
    result is the list of what those calls would return. message_ids / sentence_ids: one list (or
    None) per context; write: one flag for all, or one per context. The contexts must be of one
    model, each in the batch once; on any error (ValueError naming the context) none of them
    changes."""
    contexts = list(contexts)
    if not contexts:
        raise ValueError("decode_batch: no contexts")
    if logits not in _LOGITS:
        raise ValueError(f"logits must be one of {sorted(_LOGITS)}, got {logits!r}")
    n = len(contexts)
    token_lists = [_token_list(t) for t in tokens]
    per_context = {"tokens": token_lists, "message_ids": [None] * n if message_ids is None else list(message_ids),
                   "sentence_ids": [None] * n if sentence_ids is None else list(sentence_ids),
                   "write": [bool(write)] * n if isinstance(write, (bool, np.bool_)) else [bool(w) for w in write]}
    for name, values in per_context.items():
        if len(values) != n:
            raise ValueError(f"decode_batch: {len(values)} entries in {name} for {n} contexts")
    for i, c in enumerate(contexts):
        if not isinstance(c, Context):
            raise ValueError(f"decode_batch: context {i} is a {type(c).__name__}, not a pydeltamem.Context")
        if c.model is not contexts[0].model:
            raise ValueError(f"decode_batch: context {i} belongs to another Model than context 0")
    seg_ids = [c._segment_ids(len(t), m, s) for c, t, m, s in
               zip(contexts, token_lists, per_context["message_ids"], per_context["sentence_ids"])]
    outs = _core.decode_batch([c._native for c in contexts], token_lists, _LOGITS[logits], seg_ids, per_context["write"])
    return [None if logits == "none" else o for o in outs]


class Context:
    """One sequence being decoded: its KV cache, δ-mem state, thread pool and position."""

    def __init__(self, model: Model, *, n_ctx: int, n_batch: int, n_threads: int | None, kv_type: str,
                 dmem_fused: bool = True, poll: int = 50):
        if n_ctx <= 0 or n_batch <= 0:
            raise ValueError(f"n_ctx and n_batch must be positive (got n_ctx={n_ctx}, n_batch={n_batch})")
        self.model = model
        self.kv_type = kv_type
        self._native = _core.Context(model._native, n_ctx, n_batch, _native_n_threads(n_threads, warn=True),
                                     _kv_type_code(kv_type), dmem_fused, poll)
        # Fixed for the context's life, and read without the native context: a call that waits for
        # its turn on a busy context must not block on the context to learn its size.
        self._n_ctx: int = self._native.n_ctx

    def close(self) -> None:
        self._native.close()

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_past(self) -> int:
        """Number of tokens in the sequence so far."""
        return self._native.n_past

    @property
    def n_splits(self) -> int:
        """Graph splits of the last pass: 1 on the CPU alone, one more per change of device."""
        return self._native.n_splits

    @property
    def tokens(self) -> list[int]:
        """The token ids of the sequence so far."""
        return self._native.tokens()

    def truncate(self, n: int) -> None:
        """Keeps the first n tokens (the δ-mem state is not rolled back)."""
        self._native.truncate(n)

    def reset(self) -> None:
        """Forgets every token of the sequence (the δ-mem state is kept; see reset_memory)."""
        self._native.reset()

    def decode(self, tokens: Sequence[int] | np.ndarray, logits: str = "last", *,
               message_ids: Sequence[int] | None = None, sentence_ids: Sequence[int] | None = None,
               write: bool = True) -> np.ndarray | None:
        """Appends tokens to the sequence and returns logits.

        logits="last": float32 [n_vocab] for the last token; "all": float32 [len(tokens), n_vocab];
        "none": None (prefill only). With a δ-mem adapter, message_ids / sentence_ids (one per token,
        -1 for template glue) drive message_mean / sentence_mean writes (a call whose ids are all -1
        writes token by token, as one without ids); write=False only reads memory.
        """
        if logits not in _LOGITS:
            raise ValueError(f"logits must be one of {sorted(_LOGITS)}, got {logits!r}")
        ids = _token_list(tokens)
        seg_ids = self._segment_ids(len(ids), message_ids, sentence_ids)
        out = self._native.decode(ids, _LOGITS[logits], seg_ids, bool(write))
        return None if logits == "none" else out

    def _segment_ids(self, n: int, message_ids, sentence_ids) -> list[int] | None:
        """The ids a mean-granularity adapter groups its writes by, as the official runtime takes
        them: message_mean reads message_ids; sentence_mean needs both, a token writing only when
        both of its ids are >= 0. None (token writes): no such ids; the engine also writes per
        token when no id is >= 0."""
        if message_ids is not None:
            message_ids = _int32_list(message_ids, "message_ids")
        if sentence_ids is not None:
            sentence_ids = _int32_list(sentence_ids, "sentence_ids")
        granularity = (self.model._adapter or {}).get("write_granularity")
        if granularity not in ("message_mean", "sentence_mean"):
            return None
        needed = {"message_ids": message_ids}
        if granularity == "sentence_mean":
            needed["sentence_ids"] = sentence_ids
        for name, ids in needed.items():
            if ids is None:
                return None
            if len(ids) != n:
                # The official module ignores ids that do not match the call and writes per token.
                warnings.warn(f"{name} has {len(ids)} entries for {n} tokens: this call writes the δ-mem "
                              "memory token by token", RuntimeWarning, stacklevel=3)
                return None
        if granularity == "message_mean":
            return message_ids
        return [s if m >= 0 else -1 for m, s in zip(message_ids, sentence_ids)]

    def generate(self, tokens: Sequence[int], sampler: "_core.Sampler", *, max_tokens: int,
                 stop: Sequence[str] = (), stop_tokens: Sequence[int] = (), seg_ids: Sequence[int] | None = None,
                 write: bool = True, seg_id: int = -1, on_piece: "OnPiece | None" = None) -> completion.Generation:
        """Decodes tokens (at least one), then samples up to max_tokens tokens, decoding each but the
        last, in C++. Ends at the model's end-of-generation tokens, stop_tokens, and before a stop
        string. on_piece(bytes) receives each final piece of text; returning False stops.
        δ-mem: seg_ids are the tokens' ids of the adapter's write granularity, seg_id every
        generated token's (-1: token writes); write=False only reads the memory."""
        ids = _token_list(tokens)
        if seg_ids is not None and len(seg_ids) != len(ids):
            raise ValueError(f"seg_ids has {len(seg_ids)} entries for {len(ids)} tokens")
        out, text, finish = _core.generate(self._native, sampler, ids, max_tokens, list(stop),
                                           list(stop_tokens), on_piece, _effective_ids(seg_ids), write=bool(write),
                                           seg_id=int(seg_id))
        return completion.Generation(list(out), text.decode("utf-8", errors="replace"), finish)

    # ---- δ-mem memory ----
    def _require_adapter(self) -> dict[str, Any]:
        if self.model._adapter is None:
            raise ValueError("this model has no δ-mem adapter (load one with Model(..., adapter=PATH))")
        return self.model._adapter

    @property
    def memory_shape(self) -> tuple[int, int, int, int]:
        self._require_adapter()
        return self.model.memory_shape

    @property
    def memory(self) -> np.ndarray:
        """A copy of the δ-mem state, float32 [n_target_layers, H, r, r] (rows: value dims)."""
        return self._native.memory_get().reshape(self.memory_shape)

    @memory.setter
    def memory(self, value: np.ndarray) -> None:
        arr = np.asarray(value, dtype=np.float32)
        if arr.shape != self.memory_shape:
            raise ValueError(f"memory must have shape {self.memory_shape}, got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("memory values must be finite")
        self._native.memory_set(np.ascontiguousarray(arr).reshape(-1))

    def reset_memory(self) -> None:
        """Zeroes the δ-mem state (the tokens and KV cache are kept)."""
        self._require_adapter()
        self._native.memory_reset()

    def save_memory(self, path: str | os.PathLike) -> None:
        """Writes the δ-mem state to a small file tied to the adapter's fingerprint (atomically)."""
        _atomic.write_bytes(path, _memfile.memory_file(self._require_adapter(), self.memory))

    def load_memory(self, path: str | os.PathLike) -> None:
        """Restores a state written by save_memory; raises ValueError for another adapter's memory."""
        adapter = self._require_adapter()
        path = os.fspath(path)
        header, payload = _memfile.unpack(path, _memfile.MEMORY_MAGIC, "memory")
        _memfile.check_memory_header(header, adapter, self.memory_shape, path)
        self.memory = _memfile.floats(payload, int(np.prod(self.memory_shape)), path, "memory").reshape(self.memory_shape)

    # ---- whole-context state ----
    def _state_header(self, n_tokens: int, kv_bytes: int) -> dict[str, Any]:
        m = self.model
        return {"arch": m.arch, "n_layer": m.n_layer, "n_embd": m.n_embd, "n_vocab": m.n_vocab,
                "kv_type": self.kv_type, "n_tokens": n_tokens, "kv_bytes": kv_bytes,
                "adapter": None if m._adapter is None else m._adapter["fingerprint"]}

    def save_state(self, path: str | os.PathLike) -> None:
        """Writes tokens, KV cache and δ-mem state, so load_state continues bit-identically (atomically)."""
        _atomic.write_bytes(path, [self.get_state()])

    def load_state(self, path: str | os.PathLike) -> None:
        """Restores a file written by save_state of a context of the same model (and adapter)."""
        path = os.fspath(path)
        with open(path, "rb") as f:
            self.set_state(f.read(), path)

    def get_state(self) -> bytes:
        """Tokens, KV cache and δ-mem state as the bytes of a state file."""
        tokens = self.tokens
        kv = self._native.kv_get()
        mem = self._native.memory_get() if self.model._adapter is not None else np.zeros(0, np.float32)
        header = self._state_header(len(tokens), len(kv))
        chunks = [np.asarray(tokens, dtype="<i4").tobytes(), kv, mem.astype("<f4").tobytes()]
        return b"".join(_memfile.pack(_memfile.STATE_MAGIC, header, chunks))

    def set_state(self, data: bytes, path: str = "state") -> None:
        """Restores get_state()'s bytes (path names them in errors)."""
        header, payload = _memfile.unpack_bytes(data, _memfile.STATE_MAGIC, "state", path)
        n = _memfile.field(header, "n_tokens", int, path)
        kv_bytes = _memfile.field(header, "kv_bytes", int, path)
        expected = self._state_header(n, kv_bytes)
        for key in ("arch", "n_layer", "n_embd", "n_vocab", "kv_type", "adapter"):
            if header.get(key) != expected[key]:
                raise ValueError(f"{path!r} is the state of another model or setup: {key} is "
                                 f"{header.get(key)!r}, this context has {expected[key]!r}")
        if n < 0 or kv_bytes < 0 or len(payload) < 4 * n + kv_bytes:
            raise ValueError(f"{path!r} is truncated or corrupted")
        tokens = np.frombuffer(payload[:4 * n], dtype="<i4").tolist()
        kv = bytes(payload[4 * n:4 * n + kv_bytes])
        kv_dtype = "<f2" if self.kv_type == "f16" else "<f4"
        if kv_bytes % np.dtype(kv_dtype).itemsize:
            raise ValueError(f"{path!r} is truncated or corrupted")
        _memfile.check_finite(np.frombuffer(kv, dtype=kv_dtype), path, "the KV cache")
        mem_bytes = payload[4 * n + kv_bytes:]
        mem = None
        if self.model._adapter is not None:
            mem = _memfile.floats(mem_bytes, int(np.prod(self.memory_shape)), path, "memory")
        elif len(mem_bytes):
            raise ValueError(f"{path!r} has trailing data")
        self._native.kv_set(tokens, kv)
        if mem is not None:
            self._native.memory_set(mem)

    # ---- KV cache rows ----
    def _kv_dtype(self) -> np.dtype:
        return np.dtype("<f2" if self.kv_type == "f16" else "<f4")

    def kv_widths(self) -> tuple[int, int]:
        """Floats per token of one layer's keys and values (KV heads × key / value head size)."""
        meta, prefix = self.model.metadata, f"{self.model.arch}.attention."
        n_head = int(meta[prefix + "head_count"])
        n_head_kv = int(meta.get(prefix + "head_count_kv", n_head))
        head_k = int(meta.get(prefix + "key_length", self.model.n_embd // n_head))
        head_v = int(meta.get(prefix + "value_length", head_k))
        return n_head_kv * head_k, n_head_kv * head_v

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the KV cache, allocated for all n_ctx positions when the context is made."""
        k, v = self.kv_widths()
        return self.n_ctx * self.model.n_layer * (k + v) * self._kv_dtype().itemsize

    def get_kv(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer, (keys, values) of the sequence as float32 [n_past, width]: each token's row holds
        its KV heads one after the other, keys after normalisation and RoPE, each head's dimensions
        in the engine's order (GGUF's: llama-style models pair dimension 2i with 2i+1 for RoPE)."""
        width_k, width_v = self.kv_widths()
        data = np.frombuffer(self._native.kv_get(), dtype=self._kv_dtype())
        n, out, at = self.n_past, [], 0
        for _ in range(self.model.n_layer):
            k = data[at:at + n * width_k].reshape(n, width_k)
            at += n * width_k
            v = data[at:at + n * width_v].reshape(n, width_v)
            at += n * width_v
            out.append((k.astype(np.float32), v.astype(np.float32)))
        return out

    def set_kv(self, tokens: Sequence[int], layers: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        """Replaces the sequence with tokens and their KV rows, laid out as get_kv returns them (the
        δ-mem memory is kept). Values are rounded to the context's KV type."""
        ids = _token_list(tokens)
        width_k, width_v = self.kv_widths()
        if len(layers) != self.model.n_layer:
            raise ValueError(f"KV rows for {len(layers)} layers, the model has {self.model.n_layer}")
        chunks = []
        for i, (k, v) in enumerate(layers):
            for name, rows, width in (("keys", k, width_k), ("values", v, width_v)):
                rows = np.asarray(rows)
                if rows.shape != (len(ids), width):
                    raise ValueError(f"layer {i} {name} have shape {rows.shape}, expected {(len(ids), width)}")
                if not np.all(np.isfinite(rows)):
                    raise ValueError(f"layer {i} {name} are not all finite")
                chunks.append(np.ascontiguousarray(rows, dtype=self._kv_dtype()).tobytes())
        self._native.kv_set(ids, b"".join(chunks))


def _effective_ids(ids: Sequence[int] | None) -> list[int] | None:
    # The δ-mem reference writes token by token when a call has no id >= 0, as when it has no ids.
    if ids is None or not any(int(i) >= 0 for i in ids):
        return None
    return [int(i) for i in ids]


def _optional_token(token: int) -> int | None:
    return None if token < 0 else token


def _int32_list(values: Iterable[int] | np.ndarray, name: str) -> list[int]:
    """values as a list of ints that fit the native int32; ValueError naming the argument otherwise."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{name} must be a 1-D array of integers")
        values = values.tolist()
    out = list(values)
    for v in out:
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise ValueError(f"{name} must be integers, got {v!r}")
        if not -(2**31) <= int(v) < 2**31:
            raise ValueError(f"{name}: {v} is out of range (a 32-bit int)")
    return [int(v) for v in out]


def _token_list(tokens: Iterable[int] | np.ndarray) -> list[int]:
    return _int32_list(tokens, "token ids")
