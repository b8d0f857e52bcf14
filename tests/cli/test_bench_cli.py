"""mlx_kvq.bench (the benchmark CLI) and benchmarks/report.py (JSON and PNG output)."""

import datetime
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx_kvq  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest

from mlx_kvq.cli import bench

ROOT = Path(__file__).resolve().parents[2]


def _load(name, folder="benchmarks"):
    """A script of ``folder`` as a module (benchmarks/ is not a package on the path)."""
    spec = importlib.util.spec_from_file_location(f"kvq_bench_{name}", ROOT / folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


report = _load("report")


def _python(*args):
    """Run ``python3 *args`` in the repository with its mlx_kvq first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


# --- the CLI -----------------------------------------------------------------------------------


def test_help_lists_every_benchmark(capsys):
    assert bench.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert set(bench.BENCHMARKS) == {"attention", "generate", "prefill-memory", "batch", "fidelity"}
    for name, (module, desc, example) in bench.BENCHMARKS.items():
        assert (ROOT / "benchmarks" / f"{module}.py").is_file()
        assert desc in out
        assert example in out and example.startswith(f"mlx_kvq.bench {name} ")
    assert bench.main(["-h"]) == 0


@pytest.mark.parametrize("argv, msg", [
    (["genrate"], "unknown benchmark 'genrate'"),
    (["nope", "--help"], "unknown benchmark 'nope'"),
    ([], "name a benchmark"),
])
def test_unknown_or_missing_benchmark_fails_clearly(capsys, argv, msg):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err
    assert "usage: mlx_kvq.bench {attention,generate,prefill-memory,batch,fidelity}" in err
    if argv:
        assert "choose from attention, generate, prefill-memory, batch, fidelity" in err
    if argv == ["genrate"]:
        assert "did you mean 'generate'" in err


def test_run_passes_args_and_restores_argv_and_path():
    argv, path = sys.argv, list(sys.path)
    with pytest.raises(SystemExit) as e:
        bench.run("prefill-memory", ["--help"])
    assert e.value.code == 0
    assert sys.argv is argv and sys.path == path


def test_python_m_bench_generate_help():
    r = _python("-m", "mlx_kvq.cli.bench", "generate", "--help")
    assert r.returncode == 0, r.stderr
    for opt in ("--context", "--configs", "--json PATH", "--plot PATH"):
        assert opt in r.stdout


def test_python_m_bench_unknown_exits_2():
    r = _python("-m", "mlx_kvq.cli.bench", "speed")
    assert r.returncode == 2
    assert "unknown benchmark 'speed'" in r.stderr and "Traceback" not in r.stderr


def test_scripts_still_run_from_the_folder():
    r = _python("benchmarks/bench_prefill_memory.py", "--help")
    assert r.returncode == 0, r.stderr
    assert "--json PATH" in r.stdout and "--plot PATH" in r.stdout


def test_pyproject_ships_benchmarks_and_the_command():
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    st = cfg["tool"]["setuptools"]
    assert "mlx_kvq.benchmarks" in st["packages"]
    assert st["package-dir"]["mlx_kvq.benchmarks"] == "benchmarks"
    assert cfg["project"]["scripts"]["mlx_kvq.bench"] == "mlx_kvq.cli.bench:main"
    assert (ROOT / "benchmarks" / "__init__.py").is_file()


# --- report.py ---------------------------------------------------------------------------------

ROWS = [
    dict(keys=4096, bits=4, kernel_ms=0.05, sdpa_ms=0.04),
    dict(keys=16384, bits=4, kernel_ms=0.09, sdpa_ms=0.07),
    dict(keys=65536, bits=4, kernel_ms=0.17, sdpa_ms=np.float32(0.12)),
    dict(keys=131072, bits=4, error="RuntimeError: out of memory"),
]


def test_write_json(tmp_path):
    path = report.write_json(ROWS, tmp_path / "sub" / "out.json", dict(args={"sizes": "4096"}, note="x"))
    doc = json.loads(Path(path).read_text())
    assert doc["rows"][:2] == ROWS[:2]
    assert doc["rows"][2]["sdpa_ms"] == pytest.approx(0.12)  # numpy scalar written as a number
    assert doc["rows"][3]["error"] == ROWS[3]["error"]
    meta = doc["meta"]
    assert meta["args"] == {"sizes": "4096"} and meta["note"] == "x"
    assert meta["mlx"] == mx.__version__
    assert meta["device"].startswith(str(mx.default_device()))
    assert meta["device"] == report.device_string()
    assert isinstance(meta["device_info"], dict)
    assert meta["command"]  # the command line of this process
    assert datetime.datetime.fromisoformat(meta["date"]).tzinfo is not None


def test_write_json_keeps_given_meta(tmp_path):
    path = report.write_json([], tmp_path / "o.json", dict(command="python3 bench.py --x", device="mine"))
    meta = json.loads(path.read_text())["meta"]
    assert meta["command"] == "python3 bench.py --x" and meta["device"] == "mine"


def test_plot_numeric_x(tmp_path):
    pytest.importorskip("matplotlib")
    path = report.plot(ROWS, "keys", ["kernel_ms", "sdpa_ms"], tmp_path / "a" / "p.png", "decode attention")
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    # a single y column as a string, linear x, lines per value of a group column
    rows = ROWS + [dict(keys=4096, bits=8, kernel_ms=0.06, sdpa_ms=0.04)]
    p2 = report.plot(rows, "keys", "kernel_ms", tmp_path / "q.png", "t", logx=False, group="bits", logy=True)
    assert p2.read_bytes()[:4] == b"\x89PNG"


def test_plot_categorical_x_and_failed_runs(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(config="fp16", kv_gib=4.0, peak_gib=13.2), dict(config="kvq-4", kv_gib=1.1, peak_gib=2.2),
            dict(config="mlx-lm-4", error="ValueError: no")]
    assert report.plot(rows, "config", ["kv_gib", "peak_gib"], tmp_path / "c.png", "memory", ylabel="GiB").is_file()
    # every run failed: still a PNG (that says so), not an exception after a long benchmark
    assert report.plot(rows[2:], "config", ["kv_gib"], tmp_path / "f.png", "all failed").is_file()


def test_plot_unknown_column(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="kernl_ms"):
        report.plot(ROWS, "keys", ["kernl_ms"], tmp_path / "x.png", "typo")
    assert not (tmp_path / "x.png").exists()


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import of these now fails
    with pytest.raises(ImportError, match="pip install matplotlib"):
        report.plot(ROWS, "keys", ["kernel_ms"], tmp_path / "p.png", "t")
    with pytest.raises(ImportError, match="pip install matplotlib"):
        report.require_matplotlib()
    assert not (tmp_path / "p.png").exists()


# --- benchmarks/lab/decode_bounds.py (the decode kernel cut down for timing) -------------------------


def test_decode_bounds_cuts_apply_to_the_kernel():
    bounds = _load("decode_bounds", "benchmarks/lab")
    src = (ROOT / "metal" / "sdpa_decode.metal").read_text()
    texts = {name: bounds.cut(src, *v) for name, v in bounds.VARIANTS.items()}
    assert texts["full"].startswith("#define KVQ_CUT 0\n")
    assert texts["loads"].startswith("#define KVQ_CUT 1\n")
    assert "blk += kstep)" in texts["interleaved"] and "blk += 16)" not in texts["interleaved"]
    assert "blk += 16)" in texts["full"]
    for old in bounds._SCALE_LOADS:
        assert old in texts["loads"] and old not in texts["loads_noscales"]
    assert len(set(texts.values())) == len(texts)
    with pytest.raises(AssertionError, match="sdpa_decode.metal changed"):
        bounds.cut(src.replace("blk += 16)", "blk += 32)"), 0, True, False)


def test_decode_bounds_writes_one_tree_per_variant(tmp_path):
    bounds = _load("decode_bounds", "benchmarks/lab")
    trees = bounds.write_trees(tmp_path, list(bounds.VARIANTS))
    assert set(trees) == set(bounds.VARIANTS)
    for name, d in trees.items():
        assert (d / "mlx_kvq" / "kernels" / "decode.py").is_file() and not (d / "benchmarks" / "results").exists()
        assert (d / "metal" / "sdpa_decode.metal").read_text().startswith(f"#define KVQ_CUT {bounds.VARIANTS[name][0]}\n")


def test_bench_server_counts_the_requests_streaming_at_once():
    """``most_streaming`` over ``(ttft, end, tokens, sent)``: from each request's first token to
    its last; one ending as another starts does not overlap it; a request with no token is out."""
    bench = _load("bench_server")
    first, second = (1.0, 5.0, 4, 0.0), (2.0, 4.0, 4, 1.0)  # streaming over [1, 5] and [3, 5]
    after = (1.0, 3.0, 4, 4.0)  # [5, 7]
    assert bench.most_streaming([first, second, after, (None, 1.0, 0, 0.0)]) == 2
    assert bench.most_streaming([first, second, (0.5, 2.0, 4, 3.5), after]) == 3  # [4, 5.5] meets both


def test_bench_server_kv_bytes_are_mlx_lms_caches_bytes():
    """mlx-lm's caches of the served model's dtype (float32 on the CPU), 4-bit scales and biases
    included, hold what ``request_kv_bytes`` counts for them."""
    import mlx_lm.models.cache as lm_cache

    bench = _load("bench_server")
    config = {"num_hidden_layers": 1, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576,
              "head_dim": 64}
    for dtype in (mx.float32, mx.float16):
        k = mx.random.normal((1, 3, 512, 64)).astype(dtype)  # 512: a whole number of mlx-lm's 256-token steps
        for name, cache in [("mlx-lm-fp16", lm_cache.KVCache()), ("mlx-lm-4bit", lm_cache.QuantizedKVCache(64, 4))]:
            cache.update_and_fetch(k, k)
            assert cache.nbytes == bench.request_kv_bytes(name, config, 512, dtype.size), (name, dtype)
