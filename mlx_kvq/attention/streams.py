"""The CPU's cores for attention through MLX ops: a prefill chunk's query tiles, or a decode
step's batch rows, spread over CPU streams. Where the CPU body (``kernels.cpu``) applies it
takes the attention on threads of its own, 1.7x (decode steps) to 3.3-3.6x (prefill chunks)
faster than these streams on 2 cores (``python3 benchmarks/lab/cpu_attention.py``); the
streams serve what it does not take (a prefill chunk's array mask or keys out of order,
formats it does not read, no compiler).

MLX runs a stream's element-wise ops and its ``mx.quantized_matmul`` on one thread, and
they are most of the attention's time on the CPU (the softmax of every score, the products
over packed keys). On Linux the work goes round-robin to one CPU stream per core (at most
``MOST_STREAMS``), with OpenBLAS on one thread meanwhile (OpenBLAS's threads and the streams on
the same cores were slower than one stream). On a 2-core AMD EPYC, SmolLM2-135M: a 2048-token prompt's attention
6.5-9.3 s against 8.9-11.2 s in 2048- and 512-token steps, a decode step of 16 rows over 2k keys
15-18 against 28-30 ms per layer (``benchmarks/lab/results/cpu_prefill_attention_streams.txt``,
``cpu_decode_rows.txt``). At most ``MOST_STREAMS`` streams: MLX's CPU streams stop scaling
at 3-4 (chains of attention-like ops on a 16-core Xeon: 3.0-3.2x on 4 streams, 3.3-3.7x on 16), and
more add dispatch work on the thread that builds the graph. On that Xeon a 2048-token prompt's
attention took 8.7 s on 4 streams against 10.1-10.5 on 16 and 10.9-11.9 on one, a decode step of
16 rows 11.8 ms a layer against 19.5 on 16 and 25.7 on one
(``benchmarks/lab/results/cpu_streams_xeon.txt``).
Elsewhere (GPUs, macOS, where MLX's BLAS is not ours to set, one core) one stream does it all.
"""

import contextlib
import os
import sys
import threading

import mlx.core as mx

from .. import _blas

_POOL = threading.local()  # MLX 0.32's streams belong to the thread that made them


def cores():
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


MOST_STREAMS = 4
MAX_STREAMS = min(cores(), MOST_STREAMS)

# MLX's CPU buffer cache (32 MiB by default on its CPU-only wheel): a prefill chunk's blocks,
# their softmax and the model's activations churn through more, as do a decode step's key
# planes (``one_pass.planes_scores``), and every buffer the cache drops is freed to glibc and
# faults its pages in again when next allocated (a 2048-token prompt with 1M-element blocks:
# 0.5-1.0M page faults with 32 MiB, 0.2-30k with this; benchmarks/lab/results/cpu_prefill_blocks.txt)
CPU_CACHE_BYTES = 256 << 20
MLX_CPU_CACHE_BYTES = 32 << 20
_cache_checked = []


def keep_cpu_buffers():
    """Raise MLX's CPU buffer cache to ``CPU_CACHE_BYTES`` where MLX has only its CPU (the
    Linux CPU wheel) and the limit is still MLX's default (a limit the user set stays). Once
    per process: the blocked attention and the decode's key planes call it."""
    if _cache_checked:
        return
    _cache_checked.append(True)
    if mx.metal.is_available() or mx.cuda.is_available():
        return
    before = mx.set_cache_limit(CPU_CACHE_BYTES)
    if before != MLX_CPU_CACHE_BYTES:
        mx.set_cache_limit(before)


def streams_for(n, *inputs):
    """CPU streams for ``n`` independent pieces of work (None: one stream does it all),
    with ``inputs`` evaluated first, so that the streams share no BLAS work with what came
    before. None on GPUs, off Linux, for one piece or one core, and inside ``mx.compile`` or
    a transform (nothing can be evaluated there)."""
    n = min(n, MAX_STREAMS)
    if n < 2 or sys.platform != "linux" or mx.default_device() != mx.cpu:
        return None
    try:
        mx.eval(*inputs)
    except ValueError:  # inside mx.compile / a transform
        return None
    pool = _POOL.__dict__.setdefault("streams", [])
    while len(pool) < n:
        pool.append(mx.new_stream(mx.cpu))
    return pool[:n]


def on(streams, i):
    """The context in which piece ``i`` computes: its stream, or the current one."""
    return mx.stream(streams[i % len(streams)]) if streams else contextlib.nullcontext()


@contextlib.contextmanager
def spread(streams, results):
    """Around the work on ``streams``: OpenBLAS on one thread, and ``results`` (a list,
    filled inside) evaluated before it leaves; nothing without streams."""
    if not streams:
        yield
        return
    with _blas.single_threaded():
        yield
        mx.eval([r for r in results if r is not None])
