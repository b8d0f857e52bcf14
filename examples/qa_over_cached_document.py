"""Cache a document once, then ask several questions, each from the saved cache.

    python examples/qa_over_cached_document.py [FILE]

Each question reloads the file, so the document is prefilled once, whatever the number
of questions (the same as ``mlx_kvq.cache_prompt`` + ``mlx_kvq.generate --prompt-cache-file``).
"""

import mlx_kvq  # noqa: F401  (before mlx.core)

import os
import sys
import tempfile
import time

from mlx_lm import stream_generate

from mlx_kvq.generation import cache_document, continuation_tokens, load_document_cache, read_document
from mlx_kvq.models import load, prepare_model

DEFAULT = os.path.join(os.path.dirname(mlx_kvq.__file__), "data", "persuasion.txt")
QUESTIONS = ["Who is Sir Walter Elliot?", "Where is Kellynch Hall?", "What is Sir Walter's favourite book?"]

text = read_document(sys.argv[1]) if len(sys.argv) > 1 else open(DEFAULT).read()[:2500]
model, tokenizer = load()
prepare_model(model)
path = os.path.join(tempfile.mkdtemp(), "document.safetensors")

tic = time.perf_counter()
cache = cache_document(model, tokenizer, text, path, kv=dict(kv_bits=4))
config = cache[0].config
print(f"cached in {time.perf_counter() - tic:.1f} s: {path} ({os.path.getsize(path) / 2**20:.2f} MiB)")

for question in QUESTIONS:
    tic = time.perf_counter()
    cache, meta = load_document_cache(path, model, expect=config)  # a fresh copy per question
    tokens = continuation_tokens(tokenizer, question, meta)
    print(f"\nQ: {question}\nA: ", end="")
    for r in stream_generate(model, tokenizer, tokens, max_tokens=48, prompt_cache=cache):
        print(r.text, end="", flush=True)
    print(f"\n({time.perf_counter() - tic:.1f} s)")
