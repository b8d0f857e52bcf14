"""Every architecture of the installed mlx-lm that builds tiny on the CPU, through mlx-kvq's
caches against mlx-lm's own (``benchmarks/architectures.py``: random float32 weights, a
48-token prompt in two chunks, 4 greedy decode steps, an 8-token unquantized window)."""

import pytest

from benchmarks.architectures import CI, compare

# 8-bit: the logits of mlx-lm's fp16 cache up to quantization error (RMS error over the RMS
# centred logit; next-token top-1 agreement where the random model's logits are not near-ties)
ERR_8BIT = 0.01
# 4-bit: no worse than plain group-wise quantization at the same bits and group (``gw-4``, what
# mlx-lm's QuantizedKVCache attends over), the error summed over two prompts: one prompt's 20
# positions of a tiny random model can land either way (gpt_oss: 1.12x at 48 tokens, 0.41x at 64)
VS_GROUP_WISE_4BIT = 1.1


@pytest.mark.parametrize("model_type", CI)
def test_architecture(model_type):
    r = compare(model_type)
    for name in ("kvq8", "kvq4"):
        assert isinstance(r[name], tuple), f"{model_type} {name}: {r[name]}"
        assert r[name][0], f"{model_type} {name}: non-finite logits"
    finite, agree, err = r["kvq8"]
    assert err <= ERR_8BIT or agree >= 0.99, f"{model_type} 8-bit: agreement {agree:.3f}, error {err:.4f}"
    r64 = compare(model_type, prompt=64, caches=("kvq4", "gw-4"))
    for x in (r, r64):
        assert isinstance(x["gw-4"], tuple) and isinstance(x["kvq4"], tuple), f"{model_type}: {x}"
    kvq4, gw4 = (r[c][2] + r64[c][2] for c in ("kvq4", "gw-4"))
    assert kvq4 <= VS_GROUP_WISE_4BIT * gw4, f"{model_type} 4-bit: {r}, {r64}"
