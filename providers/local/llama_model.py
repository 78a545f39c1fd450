"""A GGUF model opened by llama.cpp in this process (``engine = "llama_cpp"``).

``load_llama_chat(cfg)`` resolves the tier's ``.gguf`` (path, ``package:``, or the
Hugging Face cache), loads it with llama.cpp's own loader (the quantized weights are
used as they are: memory-mapped, never dequantized) and returns a ``LlamaLoaded``
shaped like the transformers loader's result, so the chat provider above does not
care which engine runs. ``LlamaTokenizer`` gives that provider what it uses of a
transformers tokenizer: the chat template from the GGUF's metadata (rendered with
jinja2 the way transformers renders it), encoding, decoding.

The bindings are ``llama-cpp-python``'s low-level C API (the optional extra
``llamacpp``); without it a tier asking for this engine fails to load with
``EngineUnavailable``, which says how to install it.

Everything here blocks; the provider runs it on a thread.
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from providers.local.config import LocalTierConfig
from providers.local.resolve import ModelSpecError, resolve_model

log = structlog.get_logger(__name__)

INSTALL_HINT = (
    "engine 'llama_cpp' needs llama-cpp-python, which is not installed here: "
    "run scripts/setup.sh (it builds llama.cpp from source, several minutes), or "
    "pip install '.[llamacpp]'"
)


class EngineUnavailable(ModelSpecError):
    """The engine a tier asks for is not installed (or its build is broken)."""


_BACKEND = threading.Lock()
_backend_ready = False
# llama.cpp logs through one process-wide callback; ctypes needs the object kept alive.
_log_callback: Any = None


def import_llama_cpp() -> Any:
    """The ``llama_cpp`` bindings, with the backend initialised once per process."""
    global _backend_ready, _log_callback
    try:
        import llama_cpp
    except ImportError as exc:
        raise EngineUnavailable(INSTALL_HINT) from exc
    except OSError as exc:  # the package is there but its shared library is not loadable
        raise EngineUnavailable(f"llama-cpp-python is installed but its library does not load: {exc}") from exc
    with _BACKEND:
        if not _backend_ready:
            _log_callback = llama_cpp.llama_log_callback(_forward_log)
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True
    return llama_cpp


def _forward_log(level: int, text: bytes | None, user_data: Any) -> None:
    # ggml levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation. Only warnings and
    # errors reach our log; llama.cpp's load chatter (hundreds of lines) does not.
    if level in (3, 4) and text:
        message = text.decode("utf-8", "replace").strip()
        if message:
            (log.warning if level == 3 else log.error)("llama_cpp_log", message=message)


def available() -> bool:
    """True when llama-cpp-python can be imported here."""
    try:
        import_llama_cpp()
    except EngineUnavailable:
        return False
    return True


def _nvidia_gpu_visible() -> bool:
    # Cheap on purpose: importing torch to ask would cost the warm start a second.
    return Path("/proc/driver/nvidia/version").exists()


def check_usable(cfg: LocalTierConfig) -> None:
    """Raise ``EngineUnavailable`` when this tier cannot run on llama.cpp here: the
    bindings are missing, or the tier wants a GPU and this build has no GPU backend."""
    lib = import_llama_cpp()
    if lib.llama_supports_gpu_offload():
        return
    wants_gpu = cfg.device.startswith(("cuda", "mps")) or (cfg.device == "auto" and _nvidia_gpu_visible())
    if wants_gpu:
        raise EngineUnavailable(
            "this llama.cpp build has no GPU backend (rebuild llama-cpp-python with "
            "CMAKE_ARGS=-DGGML_CUDA=on) and the tier wants a GPU")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class LlamaModel:
    """A loaded GGUF: the llama.cpp model and its vocabulary. ``close()`` frees it."""

    def __init__(self, path: Path, cfg: LocalTierConfig) -> None:
        lib = import_llama_cpp()
        self.lib = lib
        self.path = path
        params = lib.llama_model_default_params()
        gpu = bool(lib.llama_supports_gpu_offload())
        layers = cfg.gpu_layers
        if layers is None:
            layers = -1 if gpu and cfg.device != "cpu" else 0
        params.n_gpu_layers = layers if gpu else 0
        self._split: Any = None
        if cfg.tensor_split:
            devices = int(lib.llama_max_devices())
            if len(cfg.tensor_split) > devices:
                raise ModelSpecError(
                    f"tensor_split has {len(cfg.tensor_split)} entries; this llama.cpp build "
                    f"knows {devices} device(s)")
            self._split = (ctypes.c_float * devices)(*cfg.tensor_split)
            params.tensor_split = self._split
        self.gpu_layers = params.n_gpu_layers
        self.ptr = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise ModelSpecError(f"llama.cpp cannot load {str(path)!r} (not a GGUF it knows?)")
        self.vocab = lib.llama_model_get_vocab(self.ptr)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(self.ptr))
        self.n_embd = int(lib.llama_model_n_embd(self.ptr))
        self.threads = cfg.threads or _cores()
        self._closed = False

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            self.lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def chat_template(self) -> str | None:
        raw = self.lib.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8") if raw else None

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        raw = self.lib.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", "replace") if raw else ""

    def is_eog(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the llama.cpp model is closed")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.lib.llama_model_free(self.ptr)


class LlamaTokenizer:
    """The slice of a transformers tokenizer the local chat tier uses, on llama.cpp's
    vocabulary and the GGUF's chat template. Thread-safe (the vocabulary is read-only)."""

    def __init__(self, model: LlamaModel, chat_template: str | None) -> None:
        self._model = model
        self._lib = model.lib
        self.chat_template = chat_template
        bos = int(self._lib.llama_vocab_bos(model.vocab))
        eos = int(self._lib.llama_vocab_eos(model.vocab))
        self.bos_token = model.token_text(bos) if bos >= 0 else None
        self.eos_token = model.token_text(eos) if eos >= 0 else None
        self.eos_token_id = eos if eos >= 0 else None
        self._template: Any = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; special-token text (``<|im_start|>``) becomes the special token,
        as transformers does."""
        self._model.check_open()
        raw = text.encode("utf-8")
        size = len(raw) + 8
        while True:
            out = (ctypes.c_int32 * size)()
            n = self._lib.llama_tokenize(self._model.vocab, raw, len(raw), out, size,
                                         add_special_tokens, True)
            if n >= 0:
                return list(out[:n])
            size = -n

    def decode(self, ids: list[int] | tuple[int, ...], skip_special_tokens: bool = True) -> str:
        """Text for ``ids``; an incomplete UTF-8 character at the end reads as U+FFFD
        (what the incremental detokenizer holds back on)."""
        self._model.check_open()
        if not ids:
            return ""
        tokens = (ctypes.c_int32 * len(ids))(*ids)
        size = 8 * len(ids) + 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._lib.llama_detokenize(self._model.vocab, tokens, len(ids), buf, size,
                                           False, not skip_special_tokens)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            size = -n + 1

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
        **extra: Any,
    ) -> str | list[int]:
        """Render like transformers' ``apply_chat_template`` (the same jinja2 sandbox,
        filters and variables), then optionally tokenize."""
        if self.chat_template is None:
            raise ValueError("the GGUF has no chat template")
        if self._template is None:
            self._template = _compile(self.chat_template)
        rendered = self._template.render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra,
        )
        if continue_final_message:
            rendered = _cut_after_final_message(rendered, messages[-1].get("content") or "")
        if tokenize:
            return self.encode(rendered, add_special_tokens=False)
        return rendered


def _compile(source: str) -> Any:
    """A template compiled as transformers compiles chat templates."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def _cut_after_final_message(rendered: str, final: str) -> str:
    """What transformers does for ``continue_final_message``: end the prompt right
    after the last message's text, dropping the template's end-of-turn tokens."""
    if final.strip() not in rendered:
        raise ValueError("continue_final_message: the final message is not in the rendered chat")
    at = rendered.rindex(final.strip())
    if rendered[at : at + len(final.lstrip())] == final:
        return rendered[: at + len(final.lstrip())]
    return rendered[: at + len(final.strip())]


@dataclass
class LlamaLoaded:
    """What the chat provider reads off a load (the transformers loader's shape)."""

    model: LlamaModel
    tokenizer: LlamaTokenizer
    device: str
    dtype: str
    path: Path
    max_context: int
    eos_token_ids: frozenset[int] = frozenset()
    gguf_cache_hit: bool | None = None
    generation_defaults: dict[str, Any] = field(default_factory=dict)


def resolve_gguf(cfg: LocalTierConfig) -> Path:
    resolved = resolve_model(cfg.model, allow_download=cfg.allow_download)
    if not resolved.is_gguf:
        raise ModelSpecError(
            f"engine 'llama_cpp' serves .gguf files; {cfg.model!r} is a model directory "
            "(use engine = \"continuous\" for it)")
    return resolved.path


def load_llama_chat(cfg: LocalTierConfig) -> LlamaLoaded:
    """Open the tier's GGUF with llama.cpp (the engine's context is made by the engine)."""
    import_llama_cpp()  # fail first, and clearly, when the build is absent
    path = resolve_gguf(cfg)
    model = LlamaModel(path, cfg)
    try:
        template = model.chat_template()
        if template is None:
            raise ModelSpecError(f"the GGUF {str(path)!r} has no chat template in its metadata")
        tokenizer = LlamaTokenizer(model, template)
        max_context = model.n_ctx_train or 2048
        if cfg.context_size:
            max_context = min(max_context, cfg.context_size)
        if cfg.max_context:
            max_context = min(max_context, cfg.max_context)
        quant = model.meta("general.file_type")
        defaults = _sampling_defaults(model)
    except BaseException:
        model.close()
        raise
    log.info("local_model_loaded", tier=cfg.name, path=str(path), engine="llama_cpp",
             architecture=model.meta("general.architecture"), gpu_layers=model.gpu_layers,
             threads=model.threads, max_context=max_context)
    return LlamaLoaded(
        model=model, tokenizer=tokenizer,
        device="gpu" if model.gpu_layers else "cpu",
        dtype=f"gguf file_type {quant}" if quant else "gguf",
        path=path, max_context=max_context, generation_defaults=defaults,
    )


def _sampling_defaults(model: LlamaModel) -> dict[str, Any]:
    """The GGUF's recommended sampling (``general.sampling.*``), when it has any; the
    transformers convention otherwise: no defaults, greedy."""
    temp = model.meta("general.sampling.temp")
    if temp is None:
        return {}
    out: dict[str, Any] = {"do_sample": float(temp) > 0, "temperature": float(temp)}
    top_p, top_k = model.meta("general.sampling.top_p"), model.meta("general.sampling.top_k")
    if top_p is not None:
        out["top_p"] = float(top_p)
    if top_k is not None:
        out["top_k"] = int(top_k)
    return out
