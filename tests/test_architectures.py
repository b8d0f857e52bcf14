"""Every architecture of the installed mlx-lm that builds tiny on the CPU, through mlx-kvq's
caches against mlx-lm's own (``benchmarks/architectures.py``: random float32 weights, a
48-token prompt in two chunks, 4 greedy decode steps, an 8-token unquantized window)."""

import pytest

from benchmarks.architectures import CI, compare

# 8-bit: the logits of mlx-lm's fp16 cache up to quantization error (RMS error over the RMS
# centred logit; next-token top-1 agreement where the random model's logits are not near-ties)
ERR_8BIT = 0.01
# 4-bit: no worse than mlx-lm's QuantizedKVCache at the same bits and group (a margin for
# the few positions a tiny random model compares)
VS_MLX_LM_4BIT = 1.1


@pytest.mark.parametrize("model_type", CI)
def test_architecture(model_type):
    r = compare(model_type)
    for name in ("kvq8", "kvq4"):
        assert isinstance(r[name], tuple), f"{model_type} {name}: {r[name]}"
        assert r[name][0], f"{model_type} {name}: non-finite logits"
    finite, agree, err = r["kvq8"]
    assert err <= ERR_8BIT or agree >= 0.99, f"{model_type} 8-bit: agreement {agree:.3f}, error {err:.4f}"
    if isinstance(r["mlx-lm-4"], tuple) and r["mlx-lm-4"][2] > 0 and not r["mlx_lm_4_partial"]:
        assert r["kvq4"][2] <= VS_MLX_LM_4BIT * r["mlx-lm-4"][2], f"{model_type} 4-bit: {r}"
