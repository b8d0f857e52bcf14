"""Per attention call of a tiny architecture: the kernels' output against the reference's.

Runs ``architectures.compare`` for one model and one kvq cache with every ``quantized_sdpa``
call computed twice, once as configured and once with ``MLX_KVQ_REFERENCE=1``, and prints the
calls whose outputs differ by more than ``--tol`` (relative to the output's RMS) with what
configures the call: query shape, mask, sinks, and the view's packed / window / sink runs.

    python3 benchmarks/lab/kernel_vs_reference_layers.py step3p5 --cache kvq8
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlx_kvq  # noqa: E402,F401  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402

from benchmarks import architectures  # noqa: E402
from mlx_kvq import bridge  # noqa: E402
from mlx_kvq.attention import quantized_sdpa  # noqa: E402
from mlx_kvq.cache import KVView  # noqa: E402


def describe(q, view, mask, sinks):
    k, v, n = view.packed
    wk = view.window[0]
    sk = view.sinks[0]
    m = mask if mask is None or isinstance(mask, str) else f"array{tuple(mask.shape)} {mask.dtype}"
    return (f"q{tuple(q.shape)} {q.dtype} offset {view.offset} q_start {view.q_start} packed {n} "
            f"window {0 if wk is None else wk.shape[2]} sinks {0 if sk is None else sk.shape[2]} "
            f"mask {m} attn-sinks {None if sinks is None else sinks.dtype} fmt {view.format}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--cache", default="kvq8")
    p.add_argument("--tol", type=float, default=1e-2)
    a = p.parse_args()
    calls = []

    def both(queries, view, scale=1.0, mask=None, sinks=None):
        out = quantized_sdpa(queries, view, scale=scale, mask=mask, sinks=sinks)
        os.environ["MLX_KVQ_REFERENCE"] = "1"
        try:
            ref = quantized_sdpa(queries, view, scale=scale, mask=mask, sinks=sinks)
        finally:
            os.environ.pop("MLX_KVQ_REFERENCE")
        d = (out.astype(mx.float32) - ref.astype(mx.float32))
        rms = mx.sqrt(mx.mean(ref.astype(mx.float32) ** 2)).item() + 1e-30
        err = mx.max(mx.abs(d)).item() / rms
        calls.append((err, describe(queries, view, mask, sinks)))
        return out

    bridge.ROUTES[KVView] = both
    print(architectures.compare(a.model, caches=(a.cache,)))
    bad = [c for c in calls if not c[0] <= a.tol]
    print(f"{len(calls)} calls, {len(bad)} above {a.tol}")
    for err, d in bad[:40]:
        print(f"{err:.3e}  {d}")


if __name__ == "__main__":
    main()
