"""Which module's evaluation crashes the process (a fatal signal inside MLX): every module
class of the model evaluates its output as it returns, so the faulthandler's stack names
the innermost module that failed.

    python -X faulthandler benchmarks/lab/crash_locate.py minimax_m3_vl kvq4
"""

import sys

import mlx.core as mx

from benchmarks.architectures import CACHES, CONFIGS, build, logits


def evaluating(cls):
    call = cls.__call__

    def wrapped(self, *a, **k):
        out = call(self, *a, **k)
        arrays = [x for x in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(x, mx.array)]
        mx.eval(arrays)
        return out

    cls.__call__ = wrapped


def main(model_type, cache):
    model = build(model_type)
    for cls in {type(m) for m in model.modules()}:
        evaluating(cls)
    vocab = min(CONFIGS[model_type].get("vocab_size") or 1000, 1000)
    tokens = mx.random.randint(0, vocab, (48,), key=mx.random.key(1))
    logits(model, CACHES[cache](model, 8), tokens, [32, 16], 4)
    print(model_type, cache, "ran", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
