"""Load on an OpenAI-compatible server: N concurrent clients, each one streaming
completion of a prompt of P tokens with M new tokens; for mlx-kvq's server and mlx-lm's.

    python benchmarks/bench_server.py                                  # 4 clients, 512-token prompts, 32 new
    python benchmarks/bench_server.py --clients 16 --prompt-tokens 2048 --new-tokens 64
    python benchmarks/bench_server.py --configs mlx-kvq,mlx-lm-fp16 --json server.json
    python benchmarks/bench_server.py --clients 16 --prompt-tokens 2048 --new-tokens 64 --configs mlx-kvq --max-kv-memory 186MiB

Servers (each its own process, on the embedded SmolLM2-135M-Instruct, weights dequantized
to float32 on the CPU as ``mlx_kvq.server`` does with ``--dtype auto``):

* ``mlx-kvq``: ``python -m mlx_kvq.cli.server`` (4-bit caches, continuous batching).
* ``mlx-lm-fp16``, ``mlx-lm-4bit``: mlx-lm's own server classes (``ResponseGenerator``,
  ``APIHandler``, its ``LRUPromptCache``) with mlx-lm's caches; only the model loading is
  mlx-kvq's (mlx-lm cannot load the GGUF file). ``mlx-lm-4bit`` is ``--kv-bits 4
  --quantized-kv-start 0`` (mlx-lm's default start, 5000 tokens, would leave these prompts in
  fp16); mlx-lm serves it one request at a time. mlx-lm's caches of a float32 model hold
  float32 keys and values.

Each server runs with its own defaults: mlx-lm's prefill 8 prompts together and decode up to
32 requests at once; ``mlx_kvq.server`` decodes 32 too and prefills 8 prompts together on
GPUs, one at a time on the CPU.

Every prompt begins with a different word followed by a different slice of *Northanger
Abbey*, so no request reuses another's prompt cache. The end-of-sequence token gets a
logit bias of -100 in every request (every server), so each client gets M tokens.

Figures: aggregate generation tokens/s (all clients' new tokens over the wall time from
the first request sent to the last token received), time to first token (mean and max over
the clients), the server's peak resident memory (``VmHWM``) and its resident memory after
a warm-up request (the model loaded), and the KV bytes that N sequences of P + M tokens
take in each server's cache format (``mlx_kvq.models.memory.kv_bytes`` per sequence), in the
served model's dtype (float32 on the CPU): mlx-lm's fp16 caches hold that dtype, its 4-bit
format 4-bit values plus a scale and bias per 64 in it (what ``mx.quantize`` gives), and
mlx-kvq's sinks and window hold it beside 4-bit codes with float16 scales and biases.

``--rounds R`` sends the load R times to one server, new prompts each round (sustained
load), and adds the server's resident memory after each round; ``--prompt-cache-bytes``
passes that bound to every server (each finished request's cache enters its prompt cache).

``--max-kv-memory SIZE`` runs ``mlx_kvq.server`` under that KV budget and adds, per row, the
most requests streaming at once (between their first token and their last, as the clients
saw them) and how many requests of P + M tokens the budget holds in each format: 4-bit as
served, and float16 (``kv_bytes``), which mlx-lm's servers, holding no budget, would need.
"""

import mlx_kvq  # noqa: F401  (OpenBLAS before mlx.core)

import argparse
import concurrent.futures as cf
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("Apples Rivers Mountains Lanterns Violins Kites Tulips Oysters Pebbles Harbors Meadows "
         "Candles Bridges Orchards Comets Ferns").split()
CONFIGS = ("mlx-kvq", "mlx-lm-fp16", "mlx-lm-4bit")


def serve_mlx_lm(argv):
    """Run mlx-lm's own server classes with mlx-lm's caches (``--kv-bits`` as mlx-lm takes it)."""
    import logging

    from mlx_kvq.bridge import mlx_lm_server, mlx_lm_server_parser
    from mlx_kvq.generation.serving import ModelProvider

    server = mlx_lm_server()
    args = mlx_lm_server_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()))
    provider = ModelProvider(args, kv_kwargs=None)
    server.run(args.host, args.port, provider)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(config, port, max_kv_memory=None, prompt_cache_bytes=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    common = ["--port", str(port), "--log-level", "WARNING"]  # each server's defaults
    if prompt_cache_bytes is not None:
        common += ["--prompt-cache-bytes", str(prompt_cache_bytes)]
    if config == "mlx-kvq":
        cmd = [sys.executable, "-m", "mlx_kvq.cli.server", *common]
        if max_kv_memory is not None:
            cmd += ["--max-kv-memory", str(max_kv_memory)]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-mlx-lm", *common]
        if config == "mlx-lm-4bit":
            cmd += ["--kv-bits", "4", "--quantized-kv-start", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return healthy(proc, port, config)


def healthy(proc, port, name, seconds=300):
    """``proc`` once its server on ``port`` answers ``/health``; killed, and an error, if it
    does not within ``seconds``."""
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    err = proc.stderr.read()[-2000:] if proc.stderr else ""
    raise RuntimeError(f"{name} server did not start: {err}")


def complete(port, prompt, max_tokens, eos):
    """One streaming completion: ``(ttft_s, end_s, completion_tokens, sent)``, the times from
    when it was sent (``sent``, on ``time.perf_counter``'s clock)."""
    body = {"model": "default_model", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": 0.0, "logit_bias": {str(t): -100.0 for t in eos},
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:500]}")
    ttft, tokens = None, 0
    for line in r:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        msg = json.loads(line[6:])
        if ttft is None and msg.get("choices") and msg["choices"][0].get("text"):
            ttft = time.perf_counter() - t0
        if msg.get("usage"):
            tokens = msg["usage"]["completion_tokens"]
    return ttft, time.perf_counter() - t0, tokens, t0


def most_streaming(results):
    """The most requests between their first token and their last at one time."""
    events = sorted(e for ttft, end, _, sent in results if ttft is not None
                    for e in ((sent + ttft, 1), (sent + end, -1)))  # an end sorts before a start at a tie
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def prompts(tokenizer, n, length):
    text = (ROOT / "mlx_kvq" / "data" / "northanger_abbey.txt").read_text()
    ids = tokenizer.encode(text[:200_000])
    out = []
    for i in range(n):
        start = (i * length) % max(1, len(ids) - length)
        out.append(f"{WORDS[i % len(WORDS)]}:" + tokenizer.decode(ids[start : start + length - 2]))
    return out


def request_kv_bytes(config, model_config, tokens, dense):
    """The KV bytes one sequence of ``tokens`` takes in ``config``'s cache format, unquantized
    elements (and mlx-lm's scales and biases) in the served model's dtype, of ``dense`` bytes."""
    from mlx_kvq.models.memory import kv_bytes

    if config == "mlx-kvq":  # as mlx_kvq.server sizes a request under --max-kv-memory
        return kv_bytes(model_config, tokens, bits=4, dense_bytes=dense)
    fp16 = kv_bytes(model_config, tokens)
    # mlx-lm's 4-bit format: 4 bits + a scale and bias per 64, in the model's dtype
    return fp16 * dense / 2 if config == "mlx-lm-fp16" else fp16 * (0.5 + 2 * dense / 64) / 2


def run(config, args, texts, model_config):
    port = _free_port()
    budget = args.max_kv_memory if config == "mlx-kvq" else None
    proc = start(config, port, budget, args.prompt_cache_bytes)
    clients = len(texts) // args.rounds
    results, wall, by_round = [], 0.0, []
    try:
        complete(port, "Warm up:", 2, [])
        rss = _mem_mb(proc.pid, "VmRSS")
        for r in range(args.rounds):  # the same load again, new prompts each round
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(clients) as ex:
                results += ex.map(lambda p: complete(port, p, args.new_tokens, args.eos),
                                  texts[r * clients : (r + 1) * clients])
            wall += time.perf_counter() - t0
            by_round.append(round(_mem_mb(proc.pid, "VmRSS")))
        peak = _mem_mb(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(30)
    ttfts = [r[0] for r in results if r[0] is not None]
    tokens, length = sum(r[2] for r in results), args.prompt_tokens + args.new_tokens
    row = {
        "config": config, "clients": clients, "new_tokens": tokens, "failed": sum(r[2] == 0 for r in results),
        "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
        "ttft_mean_s": round(sum(ttfts) / max(1, len(ttfts)), 2), "ttft_max_s": round(max(ttfts, default=0), 2),
        "rss_after_warmup_mb": round(rss), "peak_rss_mb": round(peak),
        "kv_mb": round(clients * request_kv_bytes(config, model_config, length, args.dense) / 2**20, 2),
        "most_streaming": most_streaming(results),
    }
    if args.rounds > 1:
        row.update(rounds=args.rounds, rss_after_each_round_mb=by_round)
    if budget is not None:
        from mlx_kvq.models.memory import kv_bytes, parse_size

        limit = parse_size(budget)
        row.update(kv_budget_mb=round(limit / 2**20, 1),
                   fit_4bit=int(limit // request_kv_bytes(config, model_config, length, args.dense)),
                   fit_fp16=int(limit // kv_bytes(model_config, length)))
    return row


def main():
    if "--serve-mlx-lm" in sys.argv:
        sys.argv.remove("--serve-mlx-lm")
        return serve_mlx_lm(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--max-kv-memory", metavar="SIZE", help="mlx_kvq.server's KV budget (e.g. 186MiB)")
    p.add_argument("--rounds", type=int, default=1,
                   help="the load this many times on one server, new prompts each round (sustained load: "
                        "resident memory after each round)")
    p.add_argument("--prompt-cache-bytes", type=int, help="every server's --prompt-cache-bytes (bytes)")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    from mlx_kvq.models import float_dtype, load, prepare_model

    model, tokenizer = load(None)
    args.dense = float_dtype(prepare_model(model)).size  # the served model's dtype, as the servers load it
    model_config = {"num_hidden_layers": len(model.layers), "num_attention_heads": model.args.num_attention_heads,
                    "num_key_value_heads": model.args.num_key_value_heads, "hidden_size": model.args.hidden_size,
                    "head_dim": model.args.head_dim or model.args.hidden_size // model.args.num_attention_heads}
    args.eos = list(tokenizer.eos_token_ids)
    texts = prompts(tokenizer, args.clients * args.rounds, args.prompt_tokens)
    del model
    print(f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores; {args.clients} clients, "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens each")
    rows = []
    for config in args.configs.split(","):
        row = run(config, args, texts, model_config)
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = ["config", "tokens_per_s", "ttft_mean_s", "ttft_max_s", "wall_s", "new_tokens", "failed",
            "kv_mb", "rss_after_warmup_mb", "peak_rss_mb", "most_streaming"]
    cols += [c for c in ("kv_budget_mb", "fit_4bit", "fit_fp16", "rounds", "rss_after_each_round_mb")
             if any(c in r for r in rows)]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
