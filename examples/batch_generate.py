"""Several prompts at once with a 4-bit KV cache; each answer is the one it gets alone.

    python examples/batch_generate.py
"""

import mlx_kvq  # noqa: F401  (before mlx.core)

from mlx_kvq.generation import batch_generate
from mlx_kvq.models import prepare_model
from mlx_kvq.models import load

prompts = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for learning to cook, one line each.",
    "Hi!",
]
model, tokenizer = load()
prepare_model(model)
result = batch_generate(model, tokenizer, prompts, max_tokens=48, kv_bits=4, verbose=True)
for prompt, text in zip(prompts, result.texts):
    print(f"\n> {prompt}\n{text}")
kv = sum(c.used_nbytes() for c in result.caches)
print(f"\nKV cache for {len(prompts)} sequences: {kv / 2**20:.2f} MiB")
