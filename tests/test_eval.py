"""mlx_kvq.eval: config parsing, CLI errors, and fidelity on the embedded model (CPU)."""

import json

import pytest

from mlx_kvq import eval as ev

# ---------------------------------------------------------------- config strings


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("fp16", ("fp16", {})),
        ("4", ("kvq", {"kv_bits": 4})),
        ("8/4", ("kvq", {"k_bits": 8, "v_bits": 4})),
        ("4:g32", ("kvq", {"kv_bits": 4, "kv_group_size": 32})),
        ("2:w128:s4", ("kvq", {"kv_bits": 2, "window": 128, "sinks": 4})),
        ("3:rkv", ("kvq", {"kv_bits": 3, "rotate": "kv"})),
        ("4:rk", ("kvq", {"kv_bits": 4, "rotate": "k"})),
        ("4:r0", ("kvq", {"kv_bits": 4, "rotate": False})),
        ("4:g64:plain", ("kvq", {"kv_bits": 4, "kv_group_size": 64, "rotate": False, "sinks": 0, "window": 0})),
        ("mxfp4", ("kvq", {"kv_bits": 4, "mode": "mxfp4"})),
        ("mxfp8", ("kvq", {"kv_bits": 8, "mode": "mxfp8"})),
        ("nvfp4:s4", ("kvq", {"kv_bits": 4, "mode": "nvfp4", "sinks": 4})),
        ("mlxlm:4:g32", ("mlxlm", {"bits": 4, "group_size": 32})),
        ("mlxlm:8", ("mlxlm", {"bits": 8, "group_size": 64})),
    ],
)
def test_parse_config(spec, expected):
    assert ev.parse_config(spec) == expected


@pytest.mark.parametrize(
    "spec, words",
    [
        ("4:g48", ["group size 48", "32, 64, 128"]),
        ("mxfp4:g64", ["group size 64", "mxfp4", "32"]),
        ("4:x3", ["unknown option 'x3'", "gN", "sN", "wN"]),
        ("7", ["bits 7", "2, 3, 4, 5, 6, 8"]),
        ("8/7", ["bits 7"]),
        ("banana", ["'banana'", "fp16"]),
        ("", ["empty"]),
        ("fp16:g32", ["no options"]),
        ("mlxlm:4:rkv", ["mlx-lm", "group size"]),
        ("mlxlm", ["needs bits"]),
        ("4:s-1", ["negative"]),
    ],
)
def test_parse_config_errors(spec, words):
    with pytest.raises(ev.ConfigError) as e:
        ev.parse_config(spec)
    for w in words:
        assert w in str(e.value)


def test_cli_rejects_bad_config(capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--configs", "4:g48"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "group size 48" in err and "32, 64, 128" in err


def test_cli_missing_text(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--text", str(tmp_path / "nope.txt")])
    assert e.value.code == 2
    assert "text file not found" in capsys.readouterr().err


def test_cli_empty_text(tmp_path, capsys):
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n")
    with pytest.raises(SystemExit) as e:
        ev.main(["--text", str(path)])
    assert e.value.code == 2
    assert "text file is empty" in capsys.readouterr().err


def test_cli_help_documents_syntax(capsys):
    with pytest.raises(SystemExit):
        ev.main(["--help"])
    out = capsys.readouterr().out
    for w in ("8/4", "gN", "sN", "wN", "rkv", "mxfp4", "plain", "mlxlm"):
        assert w in out


def test_shipped_texts_are_long_prose():
    for path in (ev.DEFAULT_TEXT, ev.TUNING_TEXT):
        text = ev.read_text(path)
        assert len(text) > 300_000
        assert "gutenberg" not in text.lower()


# ---------------------------------------------------------------- on the embedded model


@pytest.fixture(scope="module")
def fp32_model(smollm_path):
    """A private fp32 copy of the embedded model (the shared fixture stays untouched)."""
    from mlx_kvq.gguf import load_gguf

    model, tokenizer = load_gguf(smollm_path)
    return ev.to_fp32(model), tokenizer


@pytest.fixture(scope="module")
def rows(fp32_model):
    model, tokenizer = fp32_model
    tokens = ev.text_tokens(tokenizer, ev.DEFAULT_TEXT, 512)
    rows = ev.evaluate(model, tokens, ["8", "4", "4:g64:plain"], chunk=64)
    return {r["config"]: r for r in rows}


def test_fp16_baseline_row(rows):
    base = rows["fp16"]
    assert base["tokens"] == 512
    assert base["dppl_pct"] == 0 and base["kl"] == 0 and base["top1"] == 1
    assert 5 < base["ppl"] < 100
    # 30 layers x 3 KV heads x 64 dims x (K, V) x 2 bytes
    assert base["kv_bytes_per_token"] == pytest.approx(30 * 3 * 64 * 2 * 2)


def test_8bit_close_to_fp16(rows):
    r = rows["8"]
    assert abs(r["dppl_pct"]) < 1.0
    assert r["kl"] < 0.005
    assert r["top1"] > 0.95
    assert r["kv_bytes_per_token"] < 0.6 * rows["fp16"]["kv_bytes_per_token"]


def test_4bit_default_beats_plain_groupwise(rows):
    default, plain = rows["4"], rows["4:g64:plain"]
    assert default["kl"] < plain["kl"]
    assert default["dppl_pct"] < plain["dppl_pct"]
    assert default["top1"] >= plain["top1"]
    assert default["kv_bytes_per_token"] < 0.35 * rows["fp16"]["kv_bytes_per_token"]


def test_needle_found_with_fp16(fp32_model):
    model, tokenizer = fp32_model
    ctx = ev.text_tokens(tokenizer, ev.DEFAULT_TEXT, 256).tolist()
    (row,) = ev.needle_test(model, tokenizer, ctx, [], depths=(0.5,), max_tokens=16)
    assert row["config"] == "fp16"
    assert row["recall"] == 1.0, row["answers"]


def test_cli_end_to_end(smollm_path, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text(ev.read_text(ev.DEFAULT_TEXT)[:3000])
    out = tmp_path / "r.json"
    assert ev.main(["--model", str(smollm_path), "--text", str(text), "--tokens", "128",
                    "--chunk", "64", "--configs", "fp16", "8", "--json", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "fp16" in table and "bytes/tok" in table
    data = json.loads(out.read_text())
    assert [r["config"] for r in data["results"]] == ["fp16", "8"]
    assert data["tokens"] == 128
