"""The texts ``mlx_kvq.eval`` measures on (shipped in ``mlx_kvq/data``) as tokens."""

import os

import mlx.core as mx


DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
DEFAULT_TEXT = os.path.join(DATA_DIR, "persuasion.txt")
TUNING_TEXT = os.path.join(DATA_DIR, "northanger_abbey.txt")
DEFAULT_CONFIGS = ["fp16", "8", "8/4", "4", "3", "2"]


def read_text(path):
    """Read a UTF-8 text file, with clear errors for missing or empty files."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"text file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"text file is a directory: {path}")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"text file is empty: {path}")
    return text


def encode(tokenizer, text):
    """Token ids of ``text`` (no special tokens), as a Python list."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    return list(ids)


def text_tokens(tokenizer, path, n_tokens=None):
    """The first ``n_tokens`` tokens of a text file as an ``mx.array``."""
    text = read_text(path)
    if n_tokens:
        text = text[: n_tokens * 8]  # ~4-5 chars per token; plenty
    ids = encode(tokenizer, text)
    if n_tokens:
        ids = ids[:n_tokens]
    if len(ids) < 2:
        raise ValueError(f"text file {path} has fewer than 2 tokens")
    return mx.array(ids, dtype=mx.int32)
