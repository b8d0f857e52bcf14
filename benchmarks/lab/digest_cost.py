"""What hashing a prompt cache file's array bytes costs next to writing it (cache/state.py).

    python3 benchmarks/lab/digest_cost.py
"""
import time, hashlib, zlib, os, numpy as np, mlx.core as mx
# a 4-bit cache of 30 layers x 3 KV heads x 64 dims x 8192 tokens: words + fp16 scales/biases (group 64)
L, H, T, D = 30, 3, 8192, 64
arrays = {}
for i in range(L):
    for kv in "kv":
        arrays[f"{i}.{kv}.w"] = mx.random.randint(0, 2**31, (1, H, T, D * 4 // 32)).astype(mx.uint32)
        arrays[f"{i}.{kv}.s"] = mx.random.normal((1, H, T, 1)).astype(mx.float16)
        arrays[f"{i}.{kv}.b"] = mx.random.normal((1, H, T, 1)).astype(mx.float16)
mx.eval(arrays)
nbytes = sum(a.nbytes for a in arrays.values())
def best(f, n=3):
    t = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); t.append(time.perf_counter() - t0)
    return min(t)
path = "/tmp/digest_cost.safetensors"
w = best(lambda: mx.save_safetensors(path, arrays))
def digest(algo):
    h = hashlib.new(algo)
    for k in sorted(arrays):
        h.update(memoryview(np.array(arrays[k], copy=False)).cast("B"))
    return h.hexdigest()
def crc():
    c = 0
    for k in sorted(arrays):
        c = zlib.crc32(memoryview(np.array(arrays[k], copy=False)).cast("B"), c)
    return c
print(f"{nbytes/2**20:.1f} MiB; save_safetensors {w*1e3:.1f} ms")
for algo in ("sha256", "blake2b"):
    print(algo, f"{best(lambda: digest(algo))*1e3:.1f} ms")
print("crc32", f"{best(crc)*1e3:.1f} ms")
os.remove(path)
