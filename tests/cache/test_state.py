"""Saved cache states and prompt cache files: a damaged or changed file is refused with a
clear error when it is loaded, never at the first use, and an untouched one loads."""

import json

import mlx.core as mx
import mlx_lm.models.cache as lm_cache
import pytest

import mlx_kvq
from mlx_kvq import QuantizedKVCache
from mlx_kvq.cache import QuantizedRotatingKVCache
from mlx_kvq.cache import state as saved


def filled(cls=QuantizedKVCache, dtype=mx.float16, **config):
    cache = cls(**{"bits": 4, "window": 3, "sinks": 2, **config})
    mx.random.seed(0)
    for L in (20, 1, 1):
        x = mx.random.normal((1, 2, L, 64)).astype(dtype)
        cache.update_and_fetch(x, -x)
    return cache


def header(arrays):
    return json.loads("".join(chr(int(c)) for c in arrays["0.0"].tolist()))


def set_header(arrays, head):
    arrays["0.0"] = mx.array([ord(c) for c in json.dumps(head, sort_keys=True)])


def tamper(path, change):
    arrays, meta = mx.load(str(path), return_metadata=True)
    change(arrays, meta)
    mx.save_safetensors(str(path), arrays, meta)


@pytest.fixture
def saved_file(tmp_path):
    cache = filled()
    assert cache.n_packed and cache.sink_keys.shape[2] == 2 and cache.window_keys.shape[2]
    path = tmp_path / "c.safetensors"
    mlx_kvq.save_prompt_cache(path, [cache])
    return cache, path


def test_an_untouched_file_loads_exactly(saved_file):
    cache, path = saved_file
    loaded = mlx_kvq.load_prompt_cache(path)[0]
    for a, b in zip(cache.state[3:], loaded.state[3:]):
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert mx.array_equal(x, y) and x.dtype == y.dtype


def _config_change(key, value):
    def change(arrays, meta):
        head = header(arrays)
        head["config"][key] = value
        set_header(arrays, head)
    return change


def _header_change(key, value):
    def change(arrays, meta):
        head = header(arrays)
        head[key] = value
        set_header(arrays, head)
    return change


def _array_change(key, fn):
    def change(arrays, meta):
        arrays[key] = fn(arrays[key])
    return change


TAMPERED = {
    "bits": _config_change("k_bits", 8),
    "v_bits": _config_change("v_bits", 2),
    "group": _config_change("group_size", 32),
    "rotate": _config_change("rotate", None),
    "sinks": _config_change("sinks", 0),
    "window": _config_change("window", 64),
    "dims": _header_change("dims", [2, 64, 64, "bfloat16"]),
    "steps": _header_change("steps", 7),
    "offset": _array_change("0.1", lambda a: a + 1),
    "n_packed": _array_change("0.2", lambda a: a - 1),
    "scales dtype": _array_change("0.3.1", lambda a: a.astype(mx.float32)),
    "packed tokens": _array_change("0.3.0", lambda a: a[:, :, 1:]),
    "words": _array_change("0.4.0", lambda a: a[..., :4]),
    "window dtype": _array_change("0.7", lambda a: a.astype(mx.bfloat16)),
    "sink heads": _array_change("0.5", lambda a: a[:, :1]),
}


@pytest.mark.parametrize("what", sorted(TAMPERED))
def test_a_changed_file_is_refused(saved_file, what):
    cache, path = saved_file
    tamper(path, TAMPERED[what])
    with pytest.raises(ValueError, match="not a readable prompt cache file .*(digest|cache state)"):
        mlx_kvq.load_prompt_cache(path)


def test_a_missing_array_is_named(saved_file):
    cache, path = saved_file
    for key in ("0.3.2", "0.3.0", "0.7"):
        tamper(path, lambda arrays, meta: arrays.pop(key))
        with pytest.raises(ValueError, match="(keys|values) are missing"):
            mlx_kvq.load_prompt_cache(path)


def test_consistent_but_wrong_states_are_refused_without_the_digest():
    """The shape checks hold on their own: a header rewritten with a fresh digest."""
    cache = filled()
    for key, value in {"k_bits": 8, "group_size": 32, "sinks": 1, "mode": "mxfp4"}.items():
        v = list(cache.state)
        head = json.loads(v[0])
        head["config"][key] = value
        head["digest"] = saved.digest(head, dict(zip(saved.NAMES, v[3:])))
        v[0] = json.dumps(head)
        with pytest.raises(ValueError, match="cache state"):
            QuantizedKVCache.from_state(v)
    v = list(cache.state)
    v[1] += 1
    with pytest.raises(ValueError, match="offset"):
        QuantizedKVCache.from_state(v)


def test_old_or_foreign_states_are_refused():
    cache = filled()
    v = list(cache.state)
    head = json.loads(v[0])
    del head["digest"]
    with pytest.raises(ValueError, match="no digest"):
        QuantizedKVCache.from_state([json.dumps(head)] + v[1:])
    with pytest.raises(ValueError, match="not JSON"):
        QuantizedKVCache.from_state(["{"] + v[1:])
    with pytest.raises(ValueError, match="Not a mlx_kvq"):
        QuantizedKVCache.from_state(v[:5])


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_rotating_and_float32_states_round_trip(dtype):
    cache = filled(QuantizedRotatingKVCache, dtype, max_size=12, keep=2)
    assert cache.held() < cache.offset  # tokens dropped
    loaded = QuantizedRotatingKVCache.from_state(cache.state)
    assert loaded.config == cache.config and loaded.held() == cache.held()
    v = list(cache.state)
    head = json.loads(v[0])
    head["config"]["keep"] = 3
    head["digest"] = saved.digest(head, dict(zip(saved.NAMES, v[3:])))
    with pytest.raises(ValueError):
        QuantizedRotatingKVCache.from_state([json.dumps(head)] + v[1:])


def test_a_directory_is_not_a_cache_file(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        mlx_kvq.load_prompt_cache(tmp_path)


def test_mlx_lm_quantized_cache_file_is_named_as_such(tmp_path):
    c = lm_cache.QuantizedKVCache(group_size=64, bits=4)
    x = mx.random.normal((1, 2, 8, 64))
    c.update_and_fetch(x, x)
    path = tmp_path / "lm.safetensors"
    lm_cache.save_prompt_cache(str(path), [c])
    with pytest.raises(ValueError, match="mlx-lm's own QuantizedKVCache \\(bits=4, group_size=64\\)"):
        mlx_kvq.load_prompt_cache(path, expect=QuantizedKVCache(4).config)
