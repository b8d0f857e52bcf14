"""The safety net (kernels/selfcheck.py) on the CPU: the emulator stands in for the GPU,
wrapped in launchers that fail to build a kernel or return wrong numbers. A failing
configuration warns once, falls back to the reference and is not checked again; the
others keep their kernels. Also: the kernels run only while MLX computes on the GPU."""

import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlx_kvq import QuantizedKVCache, kernels, quantized_sdpa
from mlx_kvq.kernels import backend, selfcheck
from mlx_kvq.kernels.selfcheck import KernelCheckWarning
from helpers import NO_LAUNCHES, Faulty, reference_over_cache, rel_err

B, HQ, HKV, D = 1, 8, 2, 64


def filled(bits, past=90):
    mx.random.seed(bits)
    cache = QuantizedKVCache(bits=bits, group_size=32, sinks=2, window=8)
    k = mx.random.normal((B, HKV, past, D)).astype(mx.float16)
    cache.update_and_fetch(k, k * 0.5)
    return cache


def step(cache):
    k = mx.random.normal((B, HKV, 1, D)).astype(mx.float16)
    view, _ = cache.update_and_fetch(k, k * 0.5)
    return view, mx.random.normal((B, HQ, 1, D)).astype(mx.float16)


def caught(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(x.message) for x in w if issubclass(x.category, KernelCheckWarning)]


def reference_path(monkeypatch, fn):
    monkeypatch.setenv("MLX_KVQ_REFERENCE", "1")
    try:
        return fn()
    finally:
        monkeypatch.delenv("MLX_KVQ_REFERENCE")


@pytest.fixture
def checked(monkeypatch):
    """Self-checks on for the launchers of use_launcher (the emulator)."""
    monkeypatch.setenv("MLX_KVQ_SELFCHECK", "1")


def test_who_is_checked(monkeypatch):
    monkeypatch.delenv("MLX_KVQ_SELFCHECK", raising=False)
    assert selfcheck.applies(backend.MLXLauncher("metal"))
    assert not selfcheck.applies(NO_LAUNCHES)  # the tests' launchers: only when asked
    with selfcheck.forced():
        assert selfcheck.applies(NO_LAUNCHES)
    monkeypatch.setenv("MLX_KVQ_SELFCHECK", "1")
    assert selfcheck.applies(NO_LAUNCHES)
    monkeypatch.setenv("MLX_KVQ_SELFCHECK", "0")
    assert not selfcheck.applies(backend.MLXLauncher("metal"))


def test_decode_that_does_not_compile_falls_back_once(checked, monkeypatch, run_kernels_on, emu):
    cache = filled(4)
    view, q = step(cache)
    # 4-bit attention kernels fail to build; the rest (window_append, 8-bit) is sound
    launch = Faulty(emu, broken=lambda name, t: name in ("sdpa_decode", "sdpa_packed") and t["KB"] == 4)
    run_kernels_on(launch)
    out, warned = caught(lambda: quantized_sdpa(q, view, scale=D**-0.5))
    # one warning, the decode kernel's: the step then takes what MLX_KVQ_REFERENCE=1 takes
    # (no packed kernel in between)
    assert len(warned) == 1
    assert all("MLX_KVQ_REFERENCE=1" in m and "KB=4" in m for m in warned)
    assert "decode kernel" in warned[0] and "D=64" in warned[0]
    ref = reference_path(monkeypatch, lambda: quantized_sdpa(q, view, scale=D**-0.5))
    assert out.dtype == ref.dtype and np.array_equal(np.array(out), np.array(ref))
    tried = launch.count("sdpa_decode"), launch.count("sdpa_packed")
    assert tried == (1, 0)  # the check's own launch, nothing after it
    # later steps: no check, no warning, no launch of the disabled kernels
    for _ in range(2):
        view, q = step(cache)  # window_append runs on the (sound) emulator
        out, warned = caught(lambda: quantized_sdpa(q, view, scale=D**-0.5))
        assert warned == []
        assert rel_err(out, reference_over_cache(cache, q, D**-0.5)) < 4e-3
    assert (launch.count("sdpa_decode"), launch.count("sdpa_packed")) == tried
    assert launch.count("window_append") >= 2
    # another configuration on the same launcher keeps its kernel
    other = filled(8)
    view, q = step(other)
    launch.calls.clear()
    out, warned = caught(lambda: quantized_sdpa(q, view, scale=D**-0.5))
    assert warned == [] and launch.count("sdpa_decode") >= 1
    assert rel_err(out, reference_over_cache(other, q, D**-0.5)) < 4e-3
    verdicts = [r for r in selfcheck.results() if "KB=4" in r["config"] and not r["ok"]]
    assert {r["family"] for r in verdicts} >= {"decode"}
    assert all("RuntimeError" in r["why"] for r in verdicts)


def test_decode_with_wrong_numbers_falls_back(checked, monkeypatch, run_kernels_on, emu):
    cache = filled(8)
    view, q = step(cache)
    launch = Faulty(
        emu,
        wrong=lambda name, t: name == "sdpa_decode" and t["KB"] == 8,
        broken=lambda name, t: name == "sdpa_packed" and t["KB"] == 8,
    )
    run_kernels_on(launch)
    out, warned = caught(lambda: quantized_sdpa(q, view, scale=D**-0.5))
    decode_warnings = [m for m in warned if "decode kernel" in m]
    assert len(decode_warnings) == 1 and "relative error" in decode_warnings[0]
    assert "KB=8" in decode_warnings[0] and "MLX_KVQ_REFERENCE=1" in decode_warnings[0]
    ref = reference_path(monkeypatch, lambda: quantized_sdpa(q, view, scale=D**-0.5))
    assert np.array_equal(np.array(out), np.array(ref))
    n = launch.count("sdpa_decode")
    out, warned = caught(lambda: quantized_sdpa(q, view, scale=D**-0.5))
    assert warned == [] and launch.count("sdpa_decode") == n


def test_packed_kernel_that_does_not_compile_falls_back(checked, run_kernels_on, emu):
    """3-bit: no decode kernel, the packed run goes to sdpa_packed; broken, it warns once
    and the packed run's products are taken on the packed words instead."""
    mx.random.seed(3)
    cache = QuantizedKVCache(bits=3, group_size=32, sinks=2, window=8)
    k = mx.random.normal((B, HKV, 90, D)).astype(mx.float16)
    cache.update_and_fetch(k, k * 0.5)
    view, q = step(cache)
    launch = Faulty(emu, broken=lambda name, t: name == "sdpa_packed")
    run_kernels_on(launch)
    out, warned = caught(lambda: quantized_sdpa(q, view, scale=D**-0.5))
    assert len(warned) == 1 and "packed kernel" in warned[0] and "MLX_KVQ_REFERENCE=1" in warned[0]
    assert launch.count("sdpa_packed") == 1 and launch.count("sdpa_decode") == 0
    assert rel_err(out, reference_over_cache(cache, q, D**-0.5)) < 4e-3
    out, warned = caught(lambda: quantized_sdpa(q, view, scale=D**-0.5))
    assert warned == [] and launch.count("sdpa_packed") == 1


@pytest.mark.parametrize("fault", ["broken", "wrong"])
def test_prefill_kernel_that_fails_falls_back(checked, over_copy_budget, run_kernels_on, emu, fault):
    """A layer too large to copy: its prefill chunk goes to sdpa_prefill; one that does not
    compile, or computes wrong numbers, warns once and the packed kernel takes it."""
    cache = filled(4)
    k = mx.random.normal((B, HKV, 16, D)).astype(mx.float16)
    view, _ = cache.update_and_fetch(k, k * 0.5)
    q = mx.random.normal((B, HQ, 16, D)).astype(mx.float16)
    bad = lambda name, t: name == "sdpa_prefill"
    launch = Faulty(emu, **{fault: bad})
    run_kernels_on(launch)
    out, warned = caught(lambda: quantized_sdpa(q, view, scale=D**-0.5, mask="causal"))
    assert len(warned) == 1 and "prefill kernel" in warned[0] and "MLX_KVQ_REFERENCE=1" in warned[0]
    mask = mx.arange(view.offset)[None] <= mx.arange(view.offset - 16, view.offset)[:, None]
    assert rel_err(out, reference_over_cache(cache, q, D**-0.5, mask)) < 4e-3
    calls, packed = launch.count("sdpa_prefill"), launch.count("sdpa_packed")  # packed: its self-check, its run
    out, warned = caught(lambda: quantized_sdpa(q, view, scale=D**-0.5, mask="causal"))
    assert warned == [] and launch.count("sdpa_prefill") == calls and launch.count("sdpa_packed") == packed + 1


def test_a_long_prefill_chunk_keeps_the_packed_kernel(checked, over_copy_budget, run_kernels_on, emu):
    """150 queries of a 3-bit layer too large to copy (sdpa_packed's prefill): its self-check
    passes (it takes 12 queries, not more than its keys) and the kernel runs."""
    mx.random.seed(4)
    cache = QuantizedKVCache(bits=3, group_size=32, sinks=2, window=8)
    k = mx.random.normal((B, HKV, 150, D)).astype(mx.float16)
    cache.update_and_fetch(k, k * 0.5)
    view, _ = cache.update_and_fetch(k, k * 0.5)  # 150 queries over 300 keys, most packed
    q = mx.random.normal((B, HQ, 150, D)).astype(mx.float16)
    launch = Faulty(emu)
    run_kernels_on(launch)
    out, warned = caught(lambda: quantized_sdpa(q, view, scale=D**-0.5, mask="causal"))
    assert warned == [] and launch.count("sdpa_packed") >= 2  # its self-check, its run
    mask = mx.arange(300)[None] <= mx.arange(150, 300)[:, None]
    assert rel_err(out, reference_over_cache(cache, q, D**-0.5, mask)) < 4e-3


def test_window_append_body_with_a_syntax_error(checked, monkeypatch, run_kernels_on, emu):
    """A kernel body that does not compile, built by the emulator: the host path writes."""
    source = kernels.source.kernel_source

    def broken_source(name):
        common, body, inputs, outputs = source(name)
        return (common, body + "\n this is not C++ ;", inputs, outputs) if name == "window_append" else source(name)

    monkeypatch.setattr(kernels.source, "kernel_source", broken_source)  # what the emulator builds from
    monkeypatch.setattr(emu, "_kernels", {})  # kernel objects built by earlier tests: built again
    launch = Faulty(emu)
    cache, host = filled(4), filled(4)
    k = mx.random.normal((B, HKV, 1, D)).astype(mx.float16)
    for c in (cache, host):
        for _ in range(2):  # the host path: window packed down, then buffers with room for decode rows
            c.update_and_fetch(k, k)
    run_kernels_on(launch)
    _, warned = caught(lambda: cache.update_and_fetch(k, k))
    assert len(warned) == 1 and "window_append kernel" in warned[0] and "RuntimeError" in warned[0]
    reference_path(monkeypatch, lambda: host.update_and_fetch(k, k))
    assert np.array_equal(np.array(cache.window_keys), np.array(host.window_keys))
    _, warned = caught(lambda: cache.update_and_fetch(k, k))
    assert warned == [] and launch.count("window_append") == 1


def test_quantize_append_with_wrong_bits_falls_back(checked, run_kernels_on, emu):
    launch = Faulty(emu, wrong=lambda name, t: name == "quantize_append")
    run_kernels_on(launch)
    x = mx.random.normal((1, 2, 4, 64)).astype(mx.float16)
    bufs = tuple(mx.quantize(mx.zeros((1, 2, 8, 64), mx.float16), group_size=32, bits=4))
    new, warned = caught(lambda: kernels.quantize_append(x, bufs, 2, bits=4, group_size=32, mode="affine"))
    assert len(warned) == 1 and "quantize_append" in warned[0] and "differ from mx.quantize" in warned[0]
    want = mx.quantize(x, group_size=32, bits=4)
    for a, b in zip(new, want):
        assert np.array_equal(np.array(a[:, :, 2:6]), np.array(b))
    _, warned = caught(lambda: kernels.quantize_append(x, bufs, 2, bits=4, group_size=32, mode="affine"))
    assert warned == [] and launch.count("quantize_append") == 1


# ------------------------------------------------------------------ GPU stream only
def test_kernels_only_on_the_gpu_device(monkeypatch):
    monkeypatch.delenv("MLX_KVQ_REFERENCE", raising=False)
    monkeypatch.setattr(backend, "backend_name", lambda: "metal")
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert kernels.enabled()
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    assert not kernels.enabled()


def test_cpu_device_on_a_gpu_machine_takes_the_reference(monkeypatch):
    """A GPU backend with ``mx.set_default_device(mx.cpu)``: no kernel is launched
    (MLX would fail: "[custom_kernel] Only supports the GPU")."""
    monkeypatch.delenv("MLX_KVQ_REFERENCE", raising=False)
    monkeypatch.setattr(backend, "backend_name", lambda: "metal")
    monkeypatch.setitem(backend._LAUNCHERS, "metal", NO_LAUNCHES)
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)  # what it is on a machine without a GPU
    try:
        assert mx.default_device() == mx.cpu
        cache = filled(4)
        for _ in range(3):
            view, q = step(cache)
            out = quantized_sdpa(q, view, scale=D**-0.5)
            assert rel_err(out, reference_over_cache(cache, q, D**-0.5)) < 4e-3
    finally:
        mx.set_default_device(previous)
