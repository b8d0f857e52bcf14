"""Documents: read them, cache them once, ask about them later.

The prompt convention (shared by ``mlx_kvq.cache_prompt``, ``mlx_kvq.summarize`` and
``mlx_kvq.generate``): one user message ``document + "\\n\\n" + question`` through the
chat template. The cached part is the template's head up to and including the document
and the separator; a question continues it with ``question + tail``, where ``tail`` is
the template's end of the user turn and start of the assistant's (saved in the file's
metadata). So a cached document and a fresh one give the same tokens.
"""

import json
import os
import sys
from pathlib import Path

from ..bridge import cache_config, check_prompt_cache, load_prompt_cache, save_prompt_cache
from ..models.info import model_fingerprint
from .distributed import check_shard_metadata, missing_rank_file, rank_path, shard_metadata
from .prefill import Progress, build_cache, prefill
from .prompts import encode_prompt

FORMAT = "mlx_kvq.document/1"
SEPARATOR = "\n\n"
_SLOT = "\ue000MLX_KVQ_QUESTION\ue000"


def read_document(path):
    """Text of a .txt/.md (any text) file, a .pdf (with pypdf), or stdin for ``-``."""
    if str(path) == "-":
        text = sys.stdin.read()
    else:
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"The document {path} is a directory; give a .txt, .md or .pdf file.")
        if not path.is_file():
            raise FileNotFoundError(f"Document not found: {path}")
        if path.suffix.lower() == ".pdf":
            text = _read_pdf(path)
        else:
            text = _read_text(path)
    if not text.strip():
        raise ValueError(f"The document {path} is empty.")
    return text.strip()


def _read_text(path):
    """A text file's text; a binary file (NUL bytes, or mostly not UTF-8) is a ``ValueError``."""
    data = path.read_bytes()
    head = data[:65536]
    text = data.decode("utf-8", errors="replace")
    bad = head.decode("utf-8", errors="replace").count("\ufffd")
    if b"\0" in head or bad * 10 > len(head):
        raise ValueError(f"The document {path} is a binary file, not text; give a .txt, .md or .pdf file.")
    return text


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


def cache_document(model, tokenizer, document, path, *, model_name=None, system_prompt=None,
                   kv=None, prefill_step=512, progress=sys.stderr, source=None):
    """Prefill ``document`` and save its cache to ``path`` (.safetensors; under mlx.launch,
    each rank to its file, see ``distributed.rank_path``); returns the cache.

    ``kv``: ``make_prompt_cache`` keyword arguments (``None``: fp16 caches).
    """
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
        **shard_metadata(model),
    }
    save_prompt_cache(rank_path(path, model), cache, metadata)
    return cache


def load_document_cache(path, model, expect=False):
    """``(cache, metadata)`` of a cache file, checked against ``model`` and the KV config.

    ``expect``: the KV config it must have (``None``: fp16; ``False``: any).
    Files saved by plain mlx-lm (no document metadata) load with the usual checks. Under
    mlx.launch each rank loads its own file, which must come from the same split.
    """
    own = rank_path(path, model)  # under mlx.launch: this rank's file
    if not os.path.isfile(own):
        raise missing_rank_file(path, model)
    cache, meta = load_prompt_cache(own, None, return_metadata=True)
    check_shard_metadata(own, meta, model)
    if meta.get("format") == FORMAT and meta.get("fingerprint") != model_fingerprint(model):
        raise ValueError(
            f"{path} was made with another model ({meta.get('model')}); "
            "load the model it was made with, or rebuild the cache with mlx_kvq.cache_prompt."
        )
    check_prompt_cache(path, cache, model, expect)
    return cache, meta


def continuation_tokens(tokenizer, prompt, metadata, system_prompt=None, ignore_chat_template=False):
    """The tokens to feed after a loaded cache: the document convention for our files."""
    if metadata.get("format") == FORMAT:
        return question_tokens(tokenizer, prompt, metadata["tail"])
    return encode_prompt(tokenizer, prompt, system_prompt, ignore_chat_template)
