"""Where an HTTP server's time goes under ``bench_server.py``'s load: the server runs in a
process of its own (``mlx_kvq.server``, or ``--fp16``: mlx-lm's server classes with mlx-lm's
caches) with its generation thread timed: every ``BatchGenerator.next`` call (seconds, prompt
and generation responses), every request's insert, and the prompt-cache work
(``extract_cache``, ``insert_cache``, ``trim_to``); ``--profile`` adds cProfile's top
functions of that thread. Then N clients stream completions at once, as ``bench_server.py``.

    python3 benchmarks/lab/server_timeline.py --clients 16 --prompt-tokens 2048 --new-tokens 64 [--fp16] [--jit /tmp/mlx,~/.nv]
"""

import argparse
import concurrent.futures as cf
import cProfile
import io
import json
import os
import pstats
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if not __package__:
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import mlx_kvq  # noqa: E402,F401  (OpenBLAS before mlx.core)

import bench_server  # noqa: E402

EVENTS = []  # (start s, seconds, what, detail) in the server process


def _timed(owner, name, what, detail=lambda args, out: ""):
    fn = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        EVENTS.append((t0, time.perf_counter() - t0, what, detail(args, out)))
        return out

    setattr(owner, name, wrapper)


def serve(out, profile, fp16, argv):
    """Run the server with its generation thread timed; write the events (and profile) to
    ``out`` on SIGTERM."""
    from mlx_kvq.bridge import mlx_lm_server

    server = mlx_lm_server()
    _timed(server.BatchGenerator, "next", "next", lambda a, o: f"{len(o[0])} prompt, {len(o[1])} gen")
    _timed(server.BatchGenerator, "insert_segments", "insert")
    _timed(server.BatchGenerator, "extract_cache", "extract_cache", lambda a, o: f"{len(o)}")
    _timed(server.LRUPromptCache, "insert_cache", "insert_cache")
    _timed(server.LRUPromptCache, "trim_to", "trim_to")
    prof = cProfile.Profile() if profile else None
    if prof:
        generate = server.ResponseGenerator._generate

        def profiled(self):
            prof.enable()
            try:
                generate(self)
            finally:
                prof.disable()

        server.ResponseGenerator._generate = profiled

    def dump(*_):
        s = io.StringIO()
        if prof:
            prof.disable()
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(45)
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        Path(out).write_text(json.dumps({"events": EVENTS, "profile": s.getvalue()}))
        os._exit(0)

    signal.signal(signal.SIGTERM, dump)
    if fp16:
        bench_server.serve_mlx_lm(argv)
    else:
        from mlx_kvq.cli.server import main

        main(argv)


def start(port, out, args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, __file__, "--serve", out, *(["--profile"] if args.profile else []),
           *(["--fp16"] if args.fp16 else []), "--", "--port", str(port), "--log-level", "WARNING",
           *([] if args.prompt_concurrency is None else ["--prompt-concurrency", str(args.prompt_concurrency)])]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, text=True)
    return bench_server.healthy(proc, port, "the timed", seconds=600)


def report(data, t_load, sent):
    """Print the server's events after the load was sent (``sent``: time.perf_counter in the
    client; both processes share the monotonic clock) grouped, and a timeline of next()."""
    events = sorted(e for e in data["events"] if e[0] >= t_load)
    by = {}
    for t, s, what, _ in events:
        n, tot = by.get(what, (0, 0.0))
        by[what] = (n + 1, tot + s)
    for what, (n, tot) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        print(f"{what:>14}: {n:5d} calls, {tot:8.2f} s")
    print("timeline of next() (from the load sent; merged runs of like calls):")
    run = None
    for t, s, what, detail in events:
        if what != "next":
            print(f"  {t - sent:8.2f} s  {what} {detail} {s * 1e3:.1f} ms")
            continue
        key = detail
        if run and run[0] == key:
            run[1] += 1
            run[3] += s
        else:
            if run:
                print(f"  {run[2] - sent:8.2f} s  next x{run[1]} ({run[0]}): {run[3]:.2f} s")
            run = [key, 1, t, s]
    if run:
        print(f"  {run[2] - sent:8.2f} s  next x{run[1]} ({run[0]}): {run[3]:.2f} s")
    if data["profile"]:
        print(data["profile"])


def main():
    if "--serve" in sys.argv:
        own, rest = sys.argv[:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]
        return serve(own[own.index("--serve") + 1], "--profile" in own, "--fp16" in own, rest)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--fp16", action="store_true", help="mlx-lm's server classes and caches")
    p.add_argument("--prompt-concurrency", type=int, help="the servers' flag (default: each server's own)")
    p.add_argument("--profile", action="store_true", help="cProfile's top functions of the generation thread")
    p.add_argument("--jit", default="", help="folders of JIT caches (CUDA: /tmp/mlx,~/.nv): list the files "
                   "written after the warm-up request, i.e. compiled for the load")
    args = p.parse_args()
    from mlx_kvq.models import load

    _, tokenizer = load(None)
    eos = list(tokenizer.eos_token_ids)
    texts = bench_server.prompts(tokenizer, args.clients, args.prompt_tokens)
    port = bench_server._free_port()
    out = f"/tmp/server_timeline_{port}.json"
    t0 = time.perf_counter()
    proc = start(port, out, args)
    t1 = time.perf_counter()
    bench_server.complete(port, "Warm up:", 2, [])
    t_load, epoch = time.perf_counter(), time.time()
    print(f"{'mlx-lm fp16' if args.fp16 else 'mlx-kvq'}: up in {t1 - t0:.1f} s, warm-up request {t_load - t1:.1f} s")
    with cf.ThreadPoolExecutor(len(texts)) as ex:
        results = list(ex.map(lambda t: bench_server.complete(port, t, args.new_tokens, eos), texts))
    wall = time.perf_counter() - t_load
    proc.terminate()
    proc.wait(60)
    ttfts = sorted(r[0] for r in results if r[0] is not None)
    tokens = sum(r[2] for r in results)
    print(f"{args.clients} clients: {tokens} tokens in {wall:.1f} s ({tokens / wall:.2f} tok/s); first tokens at "
          + ", ".join(f"{t:.1f}" for t in ttfts) + " s")
    report(json.loads(Path(out).read_text()), t_load, t_load)
    for folder in filter(None, args.jit.split(",")):
        for f in sorted(Path(folder).expanduser().rglob("*"), key=lambda f: f.stat().st_mtime):
            if f.is_file() and f.stat().st_mtime > epoch:
                print(f"  JIT file +{f.stat().st_mtime - epoch:.1f} s: {f.name}")


if __name__ == "__main__":
    main()
