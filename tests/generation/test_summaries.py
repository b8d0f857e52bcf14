"""mlx_kvq.summarize: one pass, map-reduce past the context, cached documents, the CLI."""

import io
import os
import subprocess
import sys

import pytest

import mlx_kvq
from mlx_kvq.generation import documents as cp
from mlx_kvq.generation import summaries as sm
from mlx_kvq.models import context_length

DATA = os.path.join(os.path.dirname(mlx_kvq.__file__), "data", "persuasion.txt")


@pytest.fixture(scope="module")
def text():
    with open(DATA) as f:
        return f.read()[:2400]


def test_short_document_one_pass_matches_cached(fast_smollm, text, tmp_path):
    model, tokenizer = fast_smollm
    doc = text[:900]
    progress = io.StringIO()
    r = sm.summarize(model, tokenizer, doc, max_tokens=10, kv=dict(kv_bits=4), prefill_step=64,
                     progress=progress)
    assert r.chunks == 1 and r.text.strip()
    bar = progress.getvalue()
    assert bar.count("\r") >= 3 and "tok/s" in bar and " GB" in bar  # one update per step
    path = tmp_path / "doc.safetensors"
    cp.cache_document(model, tokenizer, doc, path, kv=dict(kv_bits=4), prefill_step=64, progress=None)
    cached = sm.summarize_cached(model, tokenizer, path, max_tokens=10,
                                 kv=mlx_kvq.make_prompt_cache(model)[0].config)
    assert cached.text == r.text


def test_long_document_is_split_not_truncated(fast_smollm, text):
    model, tokenizer = fast_smollm
    context = 320
    progress = io.StringIO()
    n = len(cp.document_tokens(tokenizer, text)[0])
    assert n > context
    r = sm.summarize(model, tokenizer, text, max_tokens=12, kv=dict(kv_bits=4), context=context,
                     progress=progress)
    assert r.chunks >= 2 and r.prompt_tokens == n and r.text.strip()
    assert "more than the model's context (320)" in progress.getvalue()
    size = sm.room(tokenizer, sm.INSTRUCTION, 12, context)
    parts = sm.split_document(tokenizer, text, size)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert "".join(parts) == tokenizer.decode(ids)  # every token of the document is read
    assert all(len(cp.document_tokens(tokenizer, p)[0]) + 12 < context for p in parts)


def test_context_from_model_config(fast_smollm):
    assert context_length(fast_smollm[0]) == 8192


def test_too_small_context_is_a_clear_error(fast_smollm, text):
    model, tokenizer = fast_smollm
    with pytest.raises(ValueError, match="lower --max-tokens"):
        sm.summarize(model, tokenizer, text, max_tokens=200, context=300, progress=None)


def run(*args):
    return subprocess.run([sys.executable, "-m", "mlx_kvq.cli.summarize", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_summarizes_with_progress_and_memory_report(tmp_path, text, smollm_path):
    doc = tmp_path / "doc.md"
    doc.write_text(text[:700])
    r = run(str(doc), "--max-tokens", "8", "--prefill-step", "64", "--instruction", "Who is Sir Walter?")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    for field in ("prefill [", "tok/s", " GB", "Peak memory", "Generation:", "KV cache:", "would take", "float16 cache"):
        assert field in r.stderr


def test_cli_reuses_a_document_cache(tmp_path, fast_smollm, text):
    model, tokenizer = fast_smollm
    path = tmp_path / "doc.safetensors"
    cp.cache_document(model, tokenizer, text[:500], path, kv=dict(kv_bits=8), progress=None)
    r = run("--prompt-cache-file", str(path), "--max-tokens", "6")  # the file's 8-bit config
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "KV cache:" in r.stderr
    r = run("--prompt-cache-file", str(path), "--kv-bits", "4", "--max-tokens", "6")  # contradicts the file
    assert r.returncode != 0 and "--kv-bits 4 contradicts" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["/nonexistent.txt"], "not found"),
        (["{empty}"], "empty"),
        (["{doc}", "--model", "/no/such/model.gguf"], "/no/such/model.gguf"),
        (["{doc}", "--kv-bits", "7"], "bits 7"),
        (["{doc}", "--kv-group-size", "48"], "group size 48"),
        ([], "give a document"),
    ],
)
def test_cli_errors(tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "doc.txt").write_text("Some text.")
    args = [a.format(empty=tmp_path / "empty.txt", doc=tmp_path / "doc.txt") for a in args]
    r = run(*args, "--max-tokens", "4")
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr


def test_help_has_examples():
    r = run("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "--prefill-step" in r.stdout
