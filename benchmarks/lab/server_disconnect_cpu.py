"""A server's CPU use (cores, from /proc) idle, while it streams one request, and in the seconds
after that client disconnects: whether the row stops computing (``test_disconnected_client_frees_its_row``
asks for less than half the streaming use 1.5 s after), or what else keeps the process busy.

    python3 benchmarks/lab/server_disconnect_cpu.py [--max-tokens 2000]
"""

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cores(pid, seconds):
    t0, c0 = time.time(), cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - c0) / (time.time() - t0)


def threads(pid):
    """Each thread's CPU seconds so far, by name."""
    out = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (t / "comm").read_text().strip()
            f = (t / "stat").read_text().rsplit(")", 1)[1].split()
            out[f"{name}/{t.name}"] = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return out


def busiest(pid, seconds):
    a = threads(pid)
    time.sleep(seconds)
    b = threads(pid)
    use = sorted(((b[k] - a.get(k, 0.0)) / seconds, k) for k in b)
    return ", ".join(f"{k} {u:.2f}" for u, k in reversed(use[-4:]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-tokens", type=int, default=2000)
    p.add_argument("--port", type=int, default=8791)
    a = p.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "mlx_kvq.cli.server", "--port", str(a.port), "--max-tokens", "12",
                             "--log-level", "WARNING", "--max-kv-memory", "48MB", "--prompt-concurrency", "3"],
                            cwd=ROOT, env=env)
    try:
        url = f"http://127.0.0.1:{a.port}"
        t = time.time()
        while True:
            try:
                if urllib.request.urlopen(url + "/health", timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        print(f"up after {time.time() - t:.1f} s", flush=True)
        req = urllib.request.Request(url + "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 3}).encode(),
                                     {"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=300).read()
        time.sleep(1)
        print(f"idle: {cores(proc.pid, 3):.2f} cores; busiest threads: {busiest(proc.pid, 2)}", flush=True)
        conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=300)
        conn.request("POST", "/v1/completions", json.dumps(
            {"prompt": "Count to a thousand:", "max_tokens": a.max_tokens, "stream": True}).encode(),
            {"Content-Type": "application/json"})
        sock = conn.sock  # the response takes it over
        events = conn.getresponse()  # server-sent events, one "data:" line a token
        t0, c0, n = time.time(), cpu_seconds(proc.pid), 0
        while time.time() - t0 < 2:
            n += events.readline().startswith(b"data:")
        print(f"streaming: {(cpu_seconds(proc.pid) - c0) / (time.time() - t0):.2f} cores, {n / 2:.0f} events/s", flush=True)
        sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
        events.close()
        t0 = time.time()
        for window in (1.5, 2, 2, 5, 10):
            start = time.time() - t0
            c0 = cpu_seconds(proc.pid)
            top = busiest(proc.pid, window)
            print(f"after the disconnect, {start:4.1f}-{start + window:4.1f} s: "
                  f"{(cpu_seconds(proc.pid) - c0) / window:.2f} cores; busiest threads: {top}", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
