"""``mlx_kvq.cache_prompt``: prefill a document once, save its quantized cache, ask later.

    mlx_kvq.cache_prompt contract.txt --prompt-cache-file contract.safetensors
    mlx_kvq.generate --prompt-cache-file contract.safetensors -p "Who pays the deposit?"
    mlx_kvq.summarize --prompt-cache-file contract.safetensors

The prompt convention (shared with ``mlx_kvq.summarize`` and ``mlx_kvq.generate``): one
user message ``document + "\\n\\n" + question`` through the chat template. The cached
part is the template's head up to and including the document and the separator; a
question continues it with ``question + tail``, where ``tail`` is the template's end
of the user turn and start of the assistant's (saved in the file's metadata). So a
cached document and a fresh one give the same tokens.
"""

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .batch import compact
from .integration import cache_config, load_prompt_cache, make_prompt_cache, patch, save_prompt_cache

FORMAT = "mlx_kvq.document/1"
SEPARATOR = "\n\n"
_SLOT = "\ue000MLX_KVQ_QUESTION\ue000"

EXAMPLES = """examples:
  mlx_kvq.cache_prompt report.md --prompt-cache-file report.safetensors
  mlx_kvq.cache_prompt contract.pdf --prompt-cache-file c.safetensors --kv-bits 8
  cat notes.txt | mlx_kvq.cache_prompt - --prompt-cache-file notes.safetensors
  mlx_kvq.generate --prompt-cache-file report.safetensors -p "What are the key dates?"
"""


# -- documents -----------------------------------------------------------------
def read_document(path):
    """Text of a .txt/.md (any text) file, a .pdf (with pypdf), or stdin for ``-``."""
    if str(path) == "-":
        text = sys.stdin.read()
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Document not found: {path}")
        if path.suffix.lower() == ".pdf":
            text = _read_pdf(path)
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"The document {path} is empty.")
    return text.strip()


def _read_pdf(path):
    try:
        import pypdf
    except ImportError:
        raise ImportError(
            f"Reading {path} needs the pypdf package: pip install pypdf "
            "(or convert the PDF to text first, e.g. pdftotext)."
        ) from None
    try:
        reader = pypdf.PdfReader(str(path))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except Exception as e:
        raise ValueError(f"Cannot read the PDF {path}: {type(e).__name__}: {e}") from None


# -- the prompt convention ------------------------------------------------------
def prompt_parts(tokenizer, document, system_prompt=None):
    """``(head, tail)`` texts: ``head + question + tail`` is the chat prompt."""
    if not getattr(tokenizer, "chat_template", None):
        return document + SEPARATOR, ""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": document + SEPARATOR + _SLOT})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head, tail = text.split(_SLOT)
    return head, tail


def _encode(tokenizer, text, first):
    """Token ids; special tokens added only at the very start of a plain (template-less) prompt."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    return list(tokenizer.encode(text, add_special_tokens=first and not templated))


def document_tokens(tokenizer, document, system_prompt=None):
    """The tokens of the cached part (template head, document, separator) and the tail text."""
    head, tail = prompt_parts(tokenizer, document, system_prompt)
    return _encode(tokenizer, head, True), tail


def question_tokens(tokenizer, question, tail):
    """The tokens that follow a document's tokens: the question and the template's tail."""
    return _encode(tokenizer, question.strip() + tail, False)


# -- prefilling -------------------------------------------------------------------
class Progress:
    """A one-line progress bar on a stream: tokens done/total, tokens/s, memory in use."""

    def __init__(self, total, stream=sys.stderr, label="prefill", width=24):
        self.total, self.stream, self.label, self.width = total, stream, label, width
        self.start = time.perf_counter()

    def __call__(self, done):
        if self.stream is None:
            return
        frac = done / max(1, self.total)
        bar = "#" * int(frac * self.width)
        tps = done / max(1e-9, time.perf_counter() - self.start)
        mem = mx.get_active_memory() / 2**30
        self.stream.write(
            f"\r{self.label} [{bar:<{self.width}}] {done}/{self.total} tokens "
            f"{tps:7.1f} tok/s  memory {mem:.2f} GiB"
        )
        if done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def prefill(model, tokens, cache, step=512, progress=None):
    """Feed ``tokens`` through ``model`` into ``cache`` in steps of ``step`` tokens.

    Only the caches are evaluated, so the logits (the vocabulary projection) are never
    computed. ``progress(done)`` is called after each step.
    """
    tokens = mx.array(tokens)
    patch(model)
    for a in range(0, len(tokens), step):
        model(tokens[a : a + step][None], cache=cache)
        mx.eval([c.state for c in cache])
        if progress:
            progress(min(len(tokens), a + step))
    for c in cache:  # pack what fell out of the recent window now (the next update would)
        if hasattr(c, "_flush"):
            c._flush()
    compact(cache)  # and free the prefill buffers that sink/window slices keep alive
    mx.eval([c.state for c in cache])
    return cache


def check_kv(kv):
    """Raise ``ValueError`` now (before loading a model) if the KV flags are not supported."""
    if kv is not None:
        from .cache import QuantizedKVCache

        bits = kv["kv_bits"] if kv.get("kv_bits") is not None else (kv.get("k_bits") or kv.get("v_bits"))
        QuantizedKVCache(
            bits, kv.get("kv_group_size"), k_bits=kv.get("k_bits"), v_bits=kv.get("v_bits"),
            mode=kv.get("mode", "affine"), rotate=kv.get("rotate"), sinks=kv.get("sinks"),
            window=kv.get("window"), start=kv.get("quantized_kv_start", 0),
        )
    return kv


# -- model identity -------------------------------------------------------------
def model_fingerprint(model):
    """A short hash of the model's config and a few embedding rows.

    It does not change when the weights are dequantized or cast (``--dtype float32``).
    """
    args = getattr(model, "args", None)
    config = vars(args) if args is not None and hasattr(args, "__dict__") else {}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if embed is not None:
        rows = embed(mx.arange(8)).astype(mx.float32)
        h.update(np.round(np.array(rows), 2).tobytes())
    else:
        h.update(str([(k, v.shape) for k, v in tree_flatten(model.parameters())][:8]).encode())
    return h.hexdigest()[:16]


# -- cache files ------------------------------------------------------------------
def cache_document(model, tokenizer, document, path, *, model_name=None, system_prompt=None,
                   kv=None, prefill_step=512, progress=sys.stderr, source=None):
    """Prefill ``document`` and save its cache to ``path`` (.safetensors); returns the cache.

    ``kv``: ``make_prompt_cache`` keyword arguments (``None``: fp16 caches).
    """
    from .generate import build_cache

    tokens, tail = document_tokens(tokenizer, document, system_prompt)
    cache = build_cache(model, kv)
    prefill(model, tokens, cache, prefill_step, Progress(len(tokens), progress))
    metadata = {
        "format": FORMAT,
        "model": str(model_name or "embedded"),
        "fingerprint": model_fingerprint(model),
        "kv_config": json.dumps(cache_config(cache), sort_keys=True),
        "separator": SEPARATOR,
        "tail": tail,
        "document_tokens": str(len(tokens)),
        "source": str(source or ""),
    }
    save_prompt_cache(str(path), cache, metadata)
    return cache


def load_document_cache(path, model, expect=False):
    """``(cache, metadata)`` of a cache file, checked against ``model`` and the KV config.

    ``expect``: the KV config it must have (``None``: fp16; ``False``: any).
    Files saved by plain mlx-lm (no document metadata) load with the usual checks.
    """
    cache, meta = load_prompt_cache(path, None, return_metadata=True)
    if meta.get("format") == FORMAT and meta.get("fingerprint") != model_fingerprint(model):
        raise ValueError(
            f"{path} was made with another model ({meta.get('model')}); "
            "load the model it was made with, or rebuild the cache with mlx_kvq.cache_prompt."
        )
    n = len(make_prompt_cache(model, kv_bits=None))
    if len(cache) != n:
        raise ValueError(f"{path} holds a cache for {len(cache)} layers; this model has {n}.")
    found = cache_config(cache)
    if expect is not False and found != expect:
        show = lambda c: "fp16 (not quantized)" if c is None else json.dumps(c, sort_keys=True)
        raise ValueError(
            f"{path} was saved with KV cache config {show(found)}, but {show(expect)} was asked "
            "for. Use the same KV flags as when the file was made."
        )
    return cache, meta


def continuation_tokens(tokenizer, prompt, metadata, system_prompt=None, ignore_chat_template=False):
    """The tokens to feed after a loaded cache: the document convention for our files."""
    from .generate import encode_prompt

    if metadata.get("format") == FORMAT:
        return question_tokens(tokenizer, prompt, metadata["tail"])
    return encode_prompt(tokenizer, prompt, system_prompt, ignore_chat_template)


# -- CLI --------------------------------------------------------------------------
def setup_arg_parser():
    from .generate import add_kv_arguments

    p = argparse.ArgumentParser(
        prog="mlx_kvq.cache_prompt",
        description="Prefill a document once and save its quantized KV cache for later questions.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("document", help=".txt/.md file, .pdf (needs pypdf), or - for stdin")
    p.add_argument("--prompt-cache-file", required=True, help="the .safetensors file to write")
    p.add_argument("--model", help="local path, Hugging Face repo or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--system-prompt", help="system prompt for the chat template")
    p.add_argument("--prefill-step", type=int, default=512, help="tokens per prefill step (default: 512)")
    add_dtype_argument(p)
    add_kv_arguments(p)
    return p


def add_dtype_argument(parser):
    parser.add_argument(
        "--dtype", choices=["auto", "model", "float32"], default="auto",
        help="compute dtype: float32 dequantizes the weights (much faster on CPU); "
        "auto: float32 when running on the CPU (default)",
    )


def prepare_model(model, dtype="auto"):
    """Dequantize the weights to float32 when asked (or on the CPU for ``auto``)."""
    if dtype == "float32" or (dtype == "auto" and mx.default_device() == mx.cpu):
        from .eval import to_fp32

        to_fp32(model)
    return model


def main(argv=None):
    from .generate import cache_kwargs, cache_report
    from .models import load

    args = setup_arg_parser().parse_args(argv)
    try:
        if args.prefill_step < 1:
            raise ValueError("--prefill-step must be at least 1.")
        kv = check_kv(cache_kwargs(args))
        document = read_document(args.document)
        model, tokenizer = load(args.model)
        prepare_model(model, args.dtype)
        tokens, _ = document_tokens(tokenizer, document, args.system_prompt)
        limit = context_length(model)
        if limit and len(tokens) > limit:
            raise ValueError(
                f"The document takes {len(tokens)} tokens; the model's context is {limit}. "
                "Use mlx_kvq.summarize, which splits long documents, or a shorter document."
            )
        cache = cache_document(
            model, tokenizer, document, args.prompt_cache_file, model_name=args.model,
            system_prompt=args.system_prompt, kv=kv, prefill_step=args.prefill_step,
            source=args.document,
        )
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, OSError) as e:
        sys.exit(f"mlx_kvq.cache_prompt: error: {e}")
    size = Path(args.prompt_cache_file).stat().st_size
    print(f"Saved {len(tokens)} tokens to {args.prompt_cache_file} ({size / 2**20:.2f} MiB)")
    print(f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB")
    print(cache_report(cache))


def context_length(model):
    """The model's context length from its config, or None if it does not say."""
    args = getattr(model, "args", None)
    for key in ("max_position_embeddings", "context_length", "max_seq_len"):
        value = getattr(args, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


if __name__ == "__main__":
    main()
