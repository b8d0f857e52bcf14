"""mlx_kvq.eval: config parsing, CLI errors, and fidelity on the embedded model (CPU)."""

import json

import pytest

from mlx_kvq import eval as ev
from mlx_kvq.cli import eval as ev_cli
from mlx_kvq.models import context_length

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
        ev_cli.main(["--configs", "4:g48"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "group size 48" in err and "32, 64, 128" in err


def test_cli_missing_text(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ev_cli.main(["--text", str(tmp_path / "nope.txt")])
    assert e.value.code == 2
    assert "text file not found" in capsys.readouterr().err


def test_cli_empty_text(tmp_path, capsys):
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n")
    with pytest.raises(SystemExit) as e:
        ev_cli.main(["--text", str(path)])
    assert e.value.code == 2
    assert "text file is empty" in capsys.readouterr().err


def test_cli_help_documents_syntax(capsys):
    with pytest.raises(SystemExit):
        ev_cli.main(["--help"])
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
def fp32_model(fast_smollm):
    """The embedded model with float32 weights (conftest's session copy)."""
    return fast_smollm


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


def test_insert_needle_is_a_paragraph_of_its_own():
    # hard-wrapped prose, as in the shipped texts: a line break is not a sentence end
    text = ("Title\n\nChapter 1\n\nSir Walter Elliot, of Kellynch Hall, was a man who,\n"
            "for his own amusement, never took up any book. He read it.\n\n"
            "Another paragraph, wrapped\nover two lines.\n\nThe end.")
    for d in (0.0, 0.3, 0.5, 0.7, 1.0):
        out = ev.insert_needle(text, d, "NEEDLE.")
        assert out.count("NEEDLE.") == 1
        assert f"\n\n{out}\n\n".count("\n\nNEEDLE.\n\n") == 1, (d, out)
        assert out.replace("\n\nNEEDLE.", "", 1).replace("NEEDLE.\n\n", "", 1) == text
    # depth 0: after the first paragraph, not glued to the start of the user turn
    assert ev.insert_needle(text, 0.0, "NEEDLE.").startswith("Title\n\nNEEDLE.")
    assert ev.insert_needle(text, 1.0, "NEEDLE.").endswith("The end.\n\nNEEDLE.")
    # no paragraph break near: after a sentence end, still as its own paragraph
    long = "word " * 1000 + "End of a sentence. " + "word " * 1000
    out = ev.insert_needle(long, 0.5, "NEEDLE.")
    assert "End of a sentence.\n\nNEEDLE.\n\nword" in out


def test_recalled_rule():
    for ans in ("violet-harbor-42", "The secret passphrase is 'Violet-Harbor-42'.",
                'The secret passphrase is "violet-harbor-42."', "violet-\nharbor-42"):
        assert ev.recalled(ans), ans
    for ans in ("The secret passphrase is:", "violet-harbour-42", "violet-harbor", ""):
        assert not ev.recalled(ans), ans


def test_needle_prompt_fits_the_context(fp32_model):
    model, tokenizer = fp32_model
    assert context_length(model) == 8192
    ctx = ev.text_tokens(tokenizer, ev.DEFAULT_TEXT, 1200).tolist()
    fitted = ev.fit_haystack(tokenizer, ctx, 1000, reserve=32)
    lengths = [len(ev.needle_prompt(tokenizer, fitted, d)) for d in ev.NEEDLE_DEPTHS]
    assert max(lengths) + 32 <= 1000 < max(lengths) + 32 + 16
    assert fitted == ctx[: len(fitted)]
    assert ev.fit_haystack(tokenizer, ctx[:500], 1000) == ctx[:500]  # already fits: untouched


def test_needle_recalled_by_fp16_and_4bit(fp32_model):
    """A ~1.1k-token prompt, prefilled in 512-token chunks: at depths 0 and 50% the needle is
    packed (4 bits) before the question attends to it. Both caches must answer with it."""
    model, tokenizer = fp32_model
    ctx = ev.text_tokens(tokenizer, ev.DEFAULT_TEXT, 1024).tolist()
    rows = ev.needle_test(model, tokenizer, ctx, ["4"], depths=(0.0, 0.5), chunk=512)
    assert [r["config"] for r in rows] == ["fp16", "4"]
    for r in rows:
        assert 1080 < r["context_tokens"] < 1100 and r["haystack_tokens"] == 1024
        assert r["recall"] == 1.0, (r["config"], r["answers"])
        assert r["hits"] == {"0": True, "0.5": True}
        for ans in r["answers"].values():
            assert ans.lower().endswith(ev.NEEDLE_ANSWER)  # decoding stopped at the passphrase
    assert ev.needle_baseline_misses(rows) == []


def test_cli_end_to_end(smollm_path, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text(ev.read_text(ev.DEFAULT_TEXT)[:3000])
    out = tmp_path / "r.json"
    assert ev_cli.main(["--model", str(smollm_path), "--text", str(text), "--tokens", "128",
                    "--chunk", "64", "--configs", "fp16", "8", "--json", str(out), "--quiet",
                    # two answer tokens cannot hold the passphrase: fp16 misses, and says so
                    "--needle", "--needle-tokens", "64", "--needle-depths", "50",
                    "--needle-max-tokens", "2"]) == 0
    table = capsys.readouterr().out
    assert "fp16" in table and "bytes/tok" in table
    assert "needle recall 0%  (50%:MISS)" in table
    assert "warning: fp16 itself missed the needle at depth 50%" in table
    data = json.loads(out.read_text())
    assert [r["config"] for r in data["results"]] == ["fp16", "8"]
    assert data["tokens"] == 128
    needle = data["needle"]
    assert [r["config"] for r in needle] == ["fp16", "8"]
    assert needle[0]["hits"] == {"0.5": False} and needle[0]["haystack_tokens"] == 64
    assert set(needle[0]) >= {"config", "context_tokens", "recall", "answers"}
