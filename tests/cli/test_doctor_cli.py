"""mlx_kvq.doctor on the CPU: small sizes, its JSON, and the self-check table with the
emulator standing in for the GPU (sound, then with a kernel that does not build)."""

import json

import pytest

from mlx_kvq.cli import doctor
from mlx_kvq.kernels import cpu
from helpers import Faulty


@pytest.fixture
def small_config(tmp_path):
    """A model config.json for the context line (no download)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(
        hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=1024, vocab_size=1000, max_position_embeddings=8192)))
    return str(path)


def test_quick_run_on_the_cpu(tmp_path, capsys, small_config):
    out = tmp_path / "doctor.json"
    doctor.main(["--quick", "--sizes", "256", "--chunk", "64", "--model", small_config, "--json", str(out)])
    text = capsys.readouterr().out
    rep = json.loads(out.read_text())
    env = rep["environment"]
    for key in ("device", "backend", "kernels", "mlx", "mlx_lm", "mlx_kvq", "platform"):
        assert env[key]
    assert rep["self_checks"] == [] and "not used on this backend" in env["kernels"]
    (row,) = rep["decode"]
    assert row["keys"] == 256 and all(row[k] > 0 for k in ("fp16_sdpa_ms", "kvq8_ms", "kvq4_ms", "kvq2_ms"))
    assert rep["prefill"]["chunk"] == 64 and rep["prefill"]["ms"] > 0 and "peak_extra_mb" in rep["prefill"]
    ctx = rep["context"]
    assert [r["cache"] for r in ctx["rows"]] == ["fp16", "8-bit", "4-bit", "3-bit", "2-bit"]
    assert ctx["rows"][-1]["max_context"] > ctx["rows"][0]["max_context"] > 0
    body = cpu.library() is not None  # the CPU body takes the CPU's attention where it is built
    assert env["cpu_body"].startswith("built" if body else "not")
    assert ("CPU body" if body else "reference path") in text and "kvq 4-bit" in text and "longest context" in text


def test_unavailable_model_is_reported(capsys):
    rep = doctor.main(["--no-bench", "--model", "/nonexistent/model.gguf"])
    assert "unavailable" in rep["context"]
    assert "unavailable: FileNotFoundError" in capsys.readouterr().out


@pytest.fixture
def few_configs(monkeypatch):
    monkeypatch.setattr(doctor, "DECODE_CONFIGS", [(8, 64, "float16", 128), (2, 32, "float16", 64)])
    monkeypatch.setattr(doctor, "QUANTIZE_CONFIGS", [(4, 64, "float16", 128)])
    monkeypatch.setattr(doctor, "WINDOW_CONFIGS", [("float16", 64, None)])
    monkeypatch.setattr(doctor, "LATENT_CONFIGS", [(4, 64, "float16", 512)])


def test_self_checks_pass_on_the_emulator(few_configs, run_kernels_on, emu, capsys):
    run_kernels_on(Faulty(emu))  # a fresh launcher: its own verdicts
    rep = doctor.main(["--no-bench", "--no-context"])
    rows = rep["self_checks"]
    assert [r["what"] for r in rows] == [
        "decode 8-bit g64 float16 D128", "decode 2-bit g32 float16 D64 rotate=kv (packed kernel)",
        "prefill 8-bit g64 float16 D128", "prefill 2-bit g32 float16 D64", "latent 4-bit g64 float16 D512",
        "quantize_append 4-bit g64 float16 D128", "window_append float16 D64"]
    assert all(r["ok"] for r in rows), rows
    text = capsys.readouterr().out
    assert text.count("pass ") == 7 and "FAIL" not in text


def test_self_checks_show_a_failing_configuration(few_configs, run_kernels_on, emu, capsys):
    run_kernels_on(Faulty(emu, broken=lambda name, t: name == "sdpa_decode"))
    with pytest.warns(RuntimeWarning, match="MLX_KVQ_REFERENCE=1"):
        rep = doctor.main(["--no-bench", "--no-context"])
    bad = [r for r in rep["self_checks"] if not r["ok"]]
    assert [r["what"] for r in bad] == ["decode 8-bit g64 float16 D128"]
    assert "RuntimeError" in bad[0]["why"]
    text = capsys.readouterr().out
    assert "FAIL  decode 8-bit g64 float16 D128" in text and "KB=8" in text
