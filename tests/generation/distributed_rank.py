"""One rank of ``test_distributed.py`` (``mlx.launch -n 2 --backend ring python
distributed_rank.py OUT [SPLIT ...]``), and the single-process run it is compared with.

Tiny float32 llama and qwen2 models with random weights from a fixed seed; for each KV
config, 32 greedy tokens after an 80-token prompt prefilled in 32-token steps (so the
pipeline's sends happen while a prefill step evaluates only the caches' state). Each
rank writes ``OUT/rank<r>.json``: its tokens, KV bytes, layer count and every rank's KV
bytes (``kv_bytes_by_rank``) per split (``tensor/qwen2``, ``pipeline/qwen2``, ...) and config.
"""

import json
import sys
from pathlib import Path

import mlx_kvq  # noqa: I001  (before mlx.core: it loads OpenBLAS)
import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.models import llama, qwen2
from mlx_kvq.generation import kv_bytes_by_rank

CONFIGS = {"kv8": {"kv_bits": 8}, "kv4": {"kv_bits": 4}, "kv4-window48": {"kv_bits": 4, "max_kv_size": 48}}
# split -> the KV configs it runs (mlx-lm's llama has no pipeline split)
SPLITS = {
    "tensor/qwen2": ("kv8", "kv4"),
    "pipeline/qwen2": ("kv8", "kv4", "kv4-window48"),
    "tensor/llama": ("kv8", "kv4", "kv4-window48"),
}
PROMPT, TOKENS, STEP = 80, 32, 32


def tiny(arch):
    """A 4-layer float32 model, 4 heads and 2 KV heads of dim 64, random weights (seed 0)
    scaled so that greedy tokens vary with the context (at mlx's init scale the model
    repeats one token) and differ between kv8 and kv4."""
    module = {"llama": llama, "qwen2": qwen2}[arch]
    args = module.ModelArgs(
        model_type=arch, hidden_size=256, num_hidden_layers=4, intermediate_size=512,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=512)
    mx.random.seed(0)
    model = module.Model(args)
    model.update(tree_map(lambda p: p * 3 if p.ndim == 2 else p, model.parameters()))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def split(model, mode, group):
    if mode == "tensor":
        model.shard(group)
    else:
        model.model.pipeline(group)
    mx.eval(model.parameters())
    return model


def run(model, configs=tuple(CONFIGS)):
    """``{config: {"tokens", "kv_bytes", "layers"}}`` for one model."""
    prompt = mx.random.randint(0, 512, (PROMPT,), key=mx.random.key(1))
    out = {}
    for name in configs:
        cache = mlx_kvq.make_prompt_cache(model, **CONFIGS[name])
        steps = generate_step(prompt, model, max_tokens=TOKENS, prompt_cache=cache, prefill_step_size=STEP)
        tokens = [int(t) for t, _ in steps]
        mx.synchronize(generation_stream)  # the step computed ahead runs on every rank before the next
        out[name] = {"tokens": tokens, "kv_bytes": sum(c.used_nbytes() for c in cache), "layers": len(cache),
                     "kv_bytes_by_rank": kv_bytes_by_rank(cache)}
    return out


def main(out_dir, *splits):
    group = mx.distributed.init()
    result = {"world_size": group.size()}
    for name in splits:
        mode, arch = name.split("/")
        result[name] = run(split(tiny(arch), mode, group), SPLITS[name])
    mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))  # no rank leaves while a peer sends
    Path(out_dir, f"rank{group.rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
