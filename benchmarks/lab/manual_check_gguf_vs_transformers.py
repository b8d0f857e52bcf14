"""Manual check (not collected by pytest): our GGUF model against transformers' GGUF loader.

    pip install torch==2.13.0 gguf
    python3 benchmarks/lab/manual_check_gguf_vs_transformers.py [model.gguf]

transformers dequantizes every tensor to fp32 and runs its own Llama in PyTorch; we run
mlx-lm's llama on the packed Q4_1/Q8_0 weights. Both are compared, per prompt, on the
logits of every position: max abs diff and top-1 agreement. The same comparison with our
weights dequantized to fp32 isolates layout errors (RoPE, names) from quantized-kernel error.
Also checks that AutoTokenizer(gguf_file=...) gives the same ids as our tokenizer.
"""

import mlx_kvq  # loads OpenBLAS before mlx.core

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch
from mlx_lm.models import llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlx_kvq.gguf import load_gguf
from mlx_kvq.models import default_model_path

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a small village by the sea, there lived",
    "Grüße! 你好, こんにちは 🙂 — 1234567 + 89 =",
]


def dequantized(model):
    """A float32 copy of ``model`` with every quantized weight dequantized."""
    weights = dict(nn.utils.tree_flatten(model.parameters()))
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            s, b = module.scales.astype(mx.float32), module.biases.astype(
                mx.float32
            )  # fp16 would round w
            w = mx.dequantize(module.weight, s, b, module.group_size, module.bits)
            out[f"{name}.weight"] = w.astype(mx.float32)
    for k, v in weights.items():
        if (
            k.endswith((".scales", ".biases"))
            or k in out
            or k.endswith(".weight")
            and k[: -len(".weight")] + ".scales" in weights
        ):
            continue
        out[k] = v.astype(mx.float32)
    fp32 = llama.Model(model.args)
    fp32.load_weights(list(out.items()), strict=True)
    mx.eval(fp32.parameters())
    return fp32


def main():
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else default_model_path()
    model, tokenizer = load_gguf(path)
    model_fp32 = dequantized(model)
    ref_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ref = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()

    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    rows = []
    for text in PROMPTS + [chat]:
        ids = tokenizer.encode(text)
        ref_ids = ref_tok.encode(text)
        assert ids == ref_ids, f"tokenizers disagree on {text!r}:\n{ids}\n{ref_ids}"
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0].numpy()
        for label, m in (("mlx packed Q4_1", model), ("mlx dequantized fp32", model_fp32)):
            got = np.array(m(mx.array([ids]))[0].astype(mx.float32))
            diff = np.abs(got - want)
            top1 = (got.argmax(-1) == want.argmax(-1)).mean()
            last = got[-1].argmax() == want[-1].argmax()
            rows.append(
                (label, len(ids), diff.max(), diff[-1].max(), top1, last, np.abs(want).max())
            )
            print(
                f"{label:22s} {len(ids):3d} tokens  max|diff| all={diff.max():.4f}"
                f" last={diff[-1].max():.4f}  top1 agree={top1:.3f} last-token top1 same={last}"
                f"  (max|logit|={np.abs(want).max():.1f})"
                f"  {text[:40]!r}"
            )
    for label in ("mlx packed Q4_1", "mlx dequantized fp32"):
        r = [x for x in rows if x[0] == label]
        n = sum(x[1] for x in r)
        print(
            f"{label}: max|diff|={max(x[2] for x in r):.4f}, "
            f"top-1 agreement={sum(x[4] * x[1] for x in r) / n:.4f} over {n} positions, "
            f"last-token top-1 same in {sum(x[5] for x in r)}/{len(r)} prompts"
        )


if __name__ == "__main__":
    main()
