"""What the GPU prefill path's per-layer sync costs: ``bench_generate``'s run (32k prompt,
2048-token chunks, Llama-3-8B shape, random 4-bit weights) for fp16 KV, kvq-4, and kvq-4 with
``mlx_kvq.attention.eval_now`` patched out (MLX then keeps several layers' dequantized copies
alive: more memory), twice each, one JSON row per run:

    python3 benchmarks/lab/prefill_layer_sync.py
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: bench_generate
import bench_generate as bg  # noqa: E402

import mlx.core as mx  # noqa: E402

import mlx_kvq.attention as att  # noqa: E402


def main():
    mx.random.seed(0)
    model = bg.random_model()
    sync = att.eval_now
    for name in ["fp16", "kvq-4", "kvq-4/noeval", "fp16", "kvq-4", "kvq-4/noeval"]:
        att.eval_now = (lambda *x: None) if name.endswith("noeval") else sync
        try:
            r = bg.run(model, name.split("/")[0], 32768, 16, 2048)
        finally:
            att.eval_now = sync
        r["config"] = name
        print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
        mx.clear_cache()


if __name__ == "__main__":
    main()
