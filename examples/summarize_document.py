"""Summarize a document with the Python API: a quantized KV cache in an mlx-lm script.

    python examples/summarize_document.py [FILE] [--instruction "..."]

With no FILE it summarizes the first pages of *Persuasion* (shipped with mlx_kvq).
"""

import mlx_kvq  # noqa: F401  (before mlx.core: loads OpenBLAS on Linux)

import argparse
import os
import sys

from mlx_kvq.cli.report import cache_report
from mlx_kvq.generation import read_document, summarize
from mlx_kvq.models import load, prepare_model

DEFAULT = os.path.join(os.path.dirname(mlx_kvq.__file__), "data", "persuasion.txt")

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("file", nargs="?")
p.add_argument("--instruction", default="Summarize the document above in three sentences.")
args = p.parse_args()

text = read_document(args.file) if args.file else open(DEFAULT).read()[:3000]
model, tokenizer = load()  # the embedded SmolLM2-135M-Instruct; or an mlx-lm repo / .gguf
prepare_model(model)  # float32 weights on the CPU (fast prefill); a no-op on a GPU
result = summarize(
    model, tokenizer, text, args.instruction,
    max_tokens=120, kv=dict(kv_bits=4), prefill_step=512, out=sys.stdout,
)
print(f"\n{result.prompt_tokens} document tokens, {result.chunks} pass(es)")
print(cache_report(result.cache))
