"""Run one of mlx-kvq's benchmarks: ``mlx_kvq.bench <benchmark> [args...]``.

Also ``python -m mlx_kvq.bench``. The benchmarks are the scripts of the repository's
``benchmarks/`` folder, installed as the package ``mlx_kvq.benchmarks``; the arguments after
the benchmark's name go to it unchanged (``mlx_kvq.bench generate --help`` shows its own
options). In a source checkout whose ``mlx_kvq.benchmarks`` cannot be imported (an editable
install made before the folder was mapped), the script is run from ``<repo>/benchmarks/``.
"""

import difflib
import importlib.util
import runpy
import sys
from pathlib import Path

# name: (module in mlx_kvq.benchmarks, one-line description, example)
BENCHMARKS = {
    "attention": (
        "bench_attention",
        "check and time the fused decode-attention kernels against fp16 sdpa (GPU)",
        "mlx_kvq.bench attention --check --time --sizes 65536,131072",
    ),
    "generate": (
        "bench_generate",
        "end-to-end prefill and decode tok/s, peak memory and KV bytes, Llama-3-8B-shaped model",
        "mlx_kvq.bench generate --context 32768 --new 48 --configs fp16,kvq-8,kvq-4 --json gen.json --plot gen.png",
    ),
    "prefill-memory": (
        "bench_prefill_memory",
        "extra memory and time of one prefill chunk's attention against a long cache",
        "mlx_kvq.bench prefill-memory --cache 32768 --chunk 2048 --json prefill.json --plot prefill.png",
    ),
    "batch": (
        "bench_batch",
        "many prompts at once (batch_generate): peak memory and KV bytes, fp16 vs 8/4/2-bit",
        "mlx_kvq.bench batch --prompts 50 --max-tokens 4 --configs fp16,4",
    ),
    "fidelity": (
        "fidelity_experiments",
        "perplexity, KL and top-1 vs fp16 of simulated cache configs (how the defaults were chosen)",
        "mlx_kvq.bench fidelity --groups 4bit --out fidelity.jsonl",
    ),
}

PROG = "mlx_kvq.bench"


def usage():
    return f"usage: {PROG} {{{','.join(BENCHMARKS)}}} [args...]"


def help_text():
    width = max(map(len, BENCHMARKS)) + 2
    lines = [
        usage(),
        "",
        "Run one of mlx-kvq's benchmarks (also: python -m mlx_kvq.bench). Each prints a table on",
        "stdout; the arguments after the name go to the benchmark, and '<name> --help' lists them",
        "(--json PATH / --plot PATH where the benchmark has them).",
        "",
        "benchmarks:",
    ]
    for name, (_, desc, example) in BENCHMARKS.items():
        lines.append(f"  {name:{width}}{desc}")
        lines.append(f"  {'':{width}}e.g. {example}")
    lines += ["", "options:", f"  {'-h, --help':{width}}show this message and exit"]
    return "\n".join(lines)


def _fail(msg):
    print(usage(), file=sys.stderr)
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def _script_in_checkout(module):
    """``<repo>/benchmarks/<module>.py`` next to this package, or None."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{module}.py"
    return path if path.is_file() else None


def run(name, args=()):
    """Run benchmark ``name`` as ``__main__`` with ``sys.argv[1:] == args``; ``sys.argv`` and
    ``sys.path`` are restored afterwards. A ``SystemExit`` of the benchmark (``--help``,
    argparse errors) propagates."""
    module = BENCHMARKS[name][0]
    full = f"mlx_kvq.benchmarks.{module}"
    try:
        spec = importlib.util.find_spec(full)
    except ImportError:  # mlx_kvq.benchmarks itself is not importable
        spec = None
    saved_argv, saved_path = sys.argv, sys.path[:]
    try:
        if spec is not None:
            sys.argv = [f"{PROG} {name}", *args]  # argparse's usage line names the command, not the file
            runpy.run_module(full, run_name="__main__")
        else:
            path = _script_in_checkout(module)
            if path is None:
                raise ModuleNotFoundError(
                    f"{full} is not installed and no benchmarks/{module}.py was found next to the "
                    f"package; reinstall mlx-kvq (pip install -e . in the repository)")
            # as `python3 benchmarks/<module>.py` would: the script's folder first on sys.path
            sys.argv = [f"{PROG} {name}", *args]
            sys.path.insert(0, str(path.parent))
            runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        return _fail("name a benchmark (--help lists them)")
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help", "help"):
        print(help_text())
        return 0
    if name not in BENCHMARKS:
        close = difflib.get_close_matches(name, list(BENCHMARKS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return _fail(f"unknown benchmark {name!r} (choose from {', '.join(BENCHMARKS)}){hint}")
    helping = any(a in ("-h", "--help") for a in rest)
    if not helping and not _on_gpu():
        if name == "attention" and "--emu" not in rest:
            return _fail("bench attention times and checks the GPU kernels, and MLX computes on the CPU here; "
                         "'mlx_kvq.bench attention --check --emu' runs the check on the CPU under the kernel "
                         "emulator (needs g++)")
        if name in ("generate", "prefill-memory"):
            print(f"{PROG}: note: on the CPU the default (Llama-3-8B-shaped, 32k-token) run takes tens of minutes; "
                  f"for a short run: '{PROG} generate --model embedded --context 1024 --new 16'",
                  file=sys.stderr)
    run(name, rest)
    return 0


def _on_gpu():
    from .. import kernels

    return kernels.backend_name() is not None and kernels.on_gpu()


if __name__ == "__main__":
    sys.exit(main())
