"""Document caches: prefill once, save, reload, ask; sizes and clear errors."""

import os
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx_lm import stream_generate

import mlx_kvq
from mlx_kvq.generation import documents as cp
from mlx_kvq.models import model_fingerprint
from mlx_kvq.cache import QuantizedKVCache

DATA = os.path.join(os.path.dirname(mlx_kvq.__file__), "data", "persuasion.txt")
QUESTION = "Who is Sir Walter Elliot?"


@pytest.fixture(scope="module")
def document():
    with open(DATA) as f:
        return f.read()[:1500]


@pytest.fixture(scope="module")
def files(fast_smollm, document, tmp_path_factory):
    """The same document cached at 4 bits and in fp16."""
    model, tokenizer = fast_smollm
    d = tmp_path_factory.mktemp("caches")
    out = {}
    for name, kv in (("q4", dict(kv_bits=4)), ("fp16", None)):
        out[name] = str(d / f"{name}.safetensors")
        cp.cache_document(model, tokenizer, document, out[name], kv=kv, progress=None)
    return out


def greedy(model, tokenizer, tokens, cache, n=8):
    return "".join(r.text for r in stream_generate(model, tokenizer, tokens, max_tokens=n, prompt_cache=cache))


def test_prompt_convention_is_the_chat_template(fast_smollm, document):
    _, tokenizer = fast_smollm
    head, tail = cp.prompt_parts(tokenizer, document)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": document + cp.SEPARATOR + QUESTION}],
        tokenize=False, add_generation_prompt=True,
    )
    assert head + QUESTION + tail == full
    assert head.endswith(document + cp.SEPARATOR) and tail.endswith("assistant\n")


def test_cached_document_answers_like_a_fresh_prompt(fast_smollm, document, files):
    model, tokenizer = fast_smollm
    doc_tokens, tail = cp.document_tokens(tokenizer, document)
    q = cp.question_tokens(tokenizer, QUESTION, tail)
    fresh = greedy(model, tokenizer, doc_tokens + q, mlx_kvq.make_prompt_cache(model, kv_bits=4))
    cache, meta = cp.load_document_cache(files["q4"], model, expect=mlx_kvq.make_prompt_cache(model)[0].config)
    assert meta["format"] == cp.FORMAT and int(meta["document_tokens"]) == len(doc_tokens)
    assert cache[0].offset == len(doc_tokens)
    tokens = cp.continuation_tokens(tokenizer, QUESTION, meta)
    assert tokens == q
    assert greedy(model, tokenizer, tokens, cache) == fresh
    assert "Walter" in fresh or "Elliot" in fresh


def test_file_is_about_4x_smaller_than_fp16(files, fast_smollm, tmp_path):
    """Against a real fp16 file of the same document (this CPU runs the model in float32)."""
    model, _ = fast_smollm
    cache = mlx_kvq.load_prompt_cache(files["fp16"], model)
    for c in cache:
        c.keys, c.values = c.keys.astype(mx.float16), c.values.astype(mx.float16)
    fp16_path, q4_path = str(tmp_path / "fp16.safetensors"), str(tmp_path / "q4.safetensors")
    mlx_kvq.save_prompt_cache(fp16_path, cache)
    # the format alone (the default 4 sinks + 32-token window add 36 fp16 tokens: 7% of
    # this 512-token document, under 0.5% of an 8k one)
    packed = [QuantizedKVCache.from_cache(c, bits=4, sinks=0, window=0) for c in cache]
    mlx_kvq.save_prompt_cache(q4_path, packed)
    fp16 = os.path.getsize(fp16_path)
    # head_dim 64, group 64: 36 bytes per token and head at 4 bits vs 128 in fp16 (0.28x)
    assert os.path.getsize(q4_path) < 0.3 * fp16
    # the default file from the float32 model: float32 scales (40 bytes per token and head)
    # and 36 float32 tokens (256 bytes): (476 * 40 + 36 * 256) / (512 * 128) = 0.43
    assert os.path.getsize(files["q4"]) < 0.44 * fp16


def test_other_kv_config_is_a_clear_error(fast_smollm, files):
    model, _ = fast_smollm
    with pytest.raises(ValueError, match="KV cache config"):
        cp.load_document_cache(files["q4"], model, expect=None)
    with pytest.raises(ValueError, match="KV cache config"):
        cp.load_document_cache(files["fp16"], model, expect=mlx_kvq.make_prompt_cache(model, kv_bits=8)[0].config)


def test_other_model_is_a_clear_error(files):
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama", hidden_size=128, num_hidden_layers=30, intermediate_size=256,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, rms_norm_eps=1e-5, vocab_size=256,
    )
    other = llama.Model(args)
    with pytest.raises(ValueError, match="another model"):
        cp.load_document_cache(files["q4"], other)


def test_fingerprint_ignores_dequantizing(smollm, fast_smollm):
    assert model_fingerprint(smollm[0]) == model_fingerprint(fast_smollm[0])


def test_read_document(tmp_path):
    p = tmp_path / "a.md"
    p.write_text("# Title\n\nBody\n")
    assert cp.read_document(p) == "# Title\n\nBody"
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        cp.read_document(tmp_path / "e.txt")
    with pytest.raises(FileNotFoundError):
        cp.read_document(tmp_path / "missing.txt")


def test_read_pdf(tmp_path):
    pypdf = pytest.importorskip("pypdf")
    path = tmp_path / "doc.pdf"
    path.write_bytes(_tiny_pdf("Hello from a PDF"))
    assert "Hello from a PDF" in cp.read_document(path)
    del pypdf


def _tiny_pdf(text):
    """A one-page PDF with one line of text (Helvetica), written by hand."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + o + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return out


def run(*args):
    return subprocess.run([sys.executable, "-m", "mlx_kvq.cli.cache_prompt", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_a_cache(tmp_path, smollm_path):
    doc = tmp_path / "d.txt"
    doc.write_text("The contract binds Alice to deliver ten apples to Bob every Monday.")
    out = tmp_path / "d.safetensors"
    r = run(str(doc), "--prompt-cache-file", str(out), "--kv-bits", "8")
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "Saved" in r.stdout and "KV cache:" in r.stdout
    assert "prefill [" in r.stderr and "tok/s" in r.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["/nonexistent.txt"], "not found"),
        (["{empty}"], "empty"),
        (["{doc}", "--kv-bits", "7"], "bits 7"),
        (["{doc}", "--model", "/no/such/model"], "/no/such/model"),
    ],
)
def test_cli_errors(tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "doc.txt").write_text("Some text.")
    args = [a.format(empty=tmp_path / "empty.txt", doc=tmp_path / "doc.txt") for a in args]
    r = run(*args, "--prompt-cache-file", str(tmp_path / "x.safetensors"))
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
