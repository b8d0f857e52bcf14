"""GGUF loading: the embedded SmolLM2 model and small GGUF files written here."""

import os
import struct
import jinja2
import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm import generate
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from mlx_kvq.models.gguf import load_gguf, read_gguf

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "In 2024 there were 366 days; 12 months, x=12345+678.",
    "def square(x):\n    return x ** 2  # comment\n\n\nclass A:\n\tpass\n",
    "Grüße aus Köln, naïve café, 你好世界, こんにちは, Привет 🙂🚀",
    "   leading spaces,  double  spaces and trailing   \r\n\n",
    "it's we'll they're I'M don't",
    "<|im_start|>user\nhi there<|im_end|>\n<|endoftext|>",
]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def reference_tokenizer(path):
    """transformers' own GGUF tokenizer builder, fed by the `gguf` package's reader.

    ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` does the same but needs torch;
    the manual check script compares against that too.
    """
    gguf = pytest.importorskip(
        "gguf", reason="needs the `gguf` package (pip install gguf) for the reference tokenizer"
    )
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    fields = gguf.GGUFReader(str(path)).fields
    spec = {
        name: fields[f"tokenizer.{key}"].contents()
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{key}" in fields
    }
    tokenizer, _ = convert_gguf_tokenizer(fields["general.architecture"].contents(), spec)
    return tokenizer


def test_config_matches_metadata(smollm, smollm_path):
    model, _ = smollm
    _, metadata = read_gguf(smollm_path)
    args = model.args
    assert (args.num_hidden_layers, args.num_attention_heads, args.num_key_value_heads) == (
        30,
        9,
        3,
    )
    assert (args.hidden_size, args.head_dim, args.intermediate_size, args.vocab_size) == (
        576,
        64,
        1536,
        49152,
    )
    assert args.num_hidden_layers == metadata["llama.block_count"].item()
    assert args.rope_theta == metadata["llama.rope.freq_base"].item() == 100000.0
    assert args.rope_traditional and args.tie_word_embeddings
    assert len(model.layers) == 30 and model.layers[0].self_attn.n_kv_heads == 3
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q, nn.QuantizedLinear) and (q.bits, q.group_size) == (4, 32)
    emb = model.model.embed_tokens
    assert isinstance(emb, nn.QuantizedEmbedding) and (emb.bits, emb.group_size) == (8, 32)


def test_tokenizer_matches_reference(smollm, smollm_path):
    _, tokenizer = smollm
    reference = reference_tokenizer(smollm_path)
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    for text in TEXTS + [prompt]:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text).ids, text
        assert tokenizer.decode(ids) == text


def test_tokenizer_specials(smollm):
    _, tokenizer = smollm
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.eos_token_ids == {2}
    assert tokenizer.encode("<|im_start|>user<|im_end|>") == [
        1,
        4093,
        2,
    ]  # no BOS added, specials kept whole
    assert tokenizer.encode("7 42") == [
        39,
        216,
        36,
        34,
    ]  # digits split one by one ('smollm' pre-tokenizer)


def test_streaming_detokenizer_unicode(smollm):
    _, tokenizer = smollm
    text = TEXTS[3]
    detok = tokenizer.detokenizer
    detok.reset()
    for t in tokenizer.encode(text):
        detok.add_token(t)
    detok.finalize()
    assert detok.text == text


def test_chat_template(smollm, smollm_path):
    _, tokenizer = smollm
    _, metadata = read_gguf(smollm_path)
    expected = jinja2.Template(metadata["tokenizer.chat_template"]).render(
        messages=MESSAGES, add_generation_prompt=True
    )
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == expected
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert ids == tokenizer.encode(text)


def test_generate_paris(smollm):
    model, tokenizer = smollm
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    text = generate(model, tokenizer, prompt, max_tokens=12)  # greedy (mlx-lm's default sampler)
    assert "Paris" in text


def test_incremental_decode_matches_full_forward(smollm):
    model, tokenizer = smollm
    ids = mx.array(
        [tokenizer.encode("The capital of France is Paris, and the capital of Italy is")]
    )
    full = model(ids)[0, -1]
    n = ids.shape[1]
    cache = make_prompt_cache(model)
    model(ids[:, : n - 3], cache=cache)
    for i in range(n - 3, n):
        last = model(ids[:, i : i + 1], cache=cache)[0, -1]
    assert mx.allclose(full, last, atol=1e-2, rtol=1e-2).item()
    assert tokenizer.decode([mx.argmax(full).item()]) == " Rome"


# Small GGUF files written with mx.save_gguf.

TINY = {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 48, "vocab": 258}
BYTES = [chr(c) for c in range(ord("!"), ord("~") + 1)]


def tiny_metadata(**overrides):
    tokens = ["<s>", "</s>"] + BYTES
    tokens += [f"x{i}" for i in range(TINY["vocab"] - len(tokens) - 1)] + ["ab"]
    md = {
        "general.architecture": "llama",
        "llama.block_count": mx.array(TINY["layers"], mx.uint32),
        "llama.embedding_length": mx.array(TINY["hidden"], mx.uint32),
        "llama.feed_forward_length": mx.array(TINY["ffn"], mx.uint32),
        "llama.attention.head_count": mx.array(TINY["heads"], mx.uint32),
        "llama.attention.head_count_kv": mx.array(TINY["kv_heads"], mx.uint32),
        "llama.attention.layer_norm_rms_epsilon": mx.array(1e-5, mx.float32),
        "llama.rope.freq_base": mx.array(10000.0, mx.float32),
        "llama.context_length": mx.array(128, mx.uint32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.token_type": mx.array([3, 3] + [1] * (len(tokens) - 2), mx.int32),
        "tokenizer.ggml.bos_token_id": mx.array(0, mx.uint32),
        "tokenizer.ggml.eos_token_id": mx.array(1, mx.uint32),
        "tokenizer.ggml.add_bos_token": mx.array(True),
    }
    md.update(overrides)
    return md


def tiny_model():
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=TINY["hidden"],
        num_hidden_layers=TINY["layers"],
        intermediate_size=TINY["ffn"],
        num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"],
        rms_norm_eps=1e-5,
        vocab_size=TINY["vocab"],
        rope_traditional=True,
        tie_word_embeddings=False,
    )
    mx.random.seed(0)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def to_gguf_names(weights):
    from mlx_kvq.models.gguf import LAYER_NAMES, TOP_NAMES

    names = {v: k for k, v in TOP_NAMES.items()}
    names.update(
        {
            f"model.layers.{i}.{v}": f"blk.{i}.{k}"
            for i in range(TINY["layers"])
            for k, v in LAYER_NAMES.items()
        }
    )
    return {names[k.rsplit(".", 1)[0]] + "." + k.rsplit(".", 1)[1]: v for k, v in weights.items()}


def test_tiny_float_gguf_matches_source_model(tmp_path):
    source = tiny_model()
    path = tmp_path / "tiny.gguf"
    weights = dict(nn.utils.tree_flatten(source.parameters()))
    mx.save_gguf(str(path), to_gguf_names(weights), tiny_metadata())
    model, tokenizer = load_gguf(path)
    assert not model.args.tie_word_embeddings and isinstance(model.lm_head, nn.Linear)
    ids = mx.array([[0, 5, 9, 200, 257]])
    assert mx.allclose(model(ids), source(ids), atol=1e-5).item()
    assert tokenizer.encode("ab!") == [0, 257, 2]  # BOS added; the one merge applied
    assert tokenizer.decode([257, 2]) == "ab!"


def write_tiny(path, metadata, tensors=None):
    mx.save_gguf(str(path), tensors or {"output_norm.weight": mx.ones((TINY["hidden"],))}, metadata)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(path)


def test_truncated_gguf(tmp_path, smollm_path):
    path = tmp_path / "cut.gguf"
    with open(smollm_path, "rb") as f:
        path.write_bytes(f.read(3_000_000))
    with pytest.raises(ValueError, match="cannot read GGUF file.*cut.gguf"):
        load_gguf(path)


def test_wrong_architecture(tmp_path):
    path = write_tiny(tmp_path / "gemma.gguf", tiny_metadata(**{"general.architecture": "gemma"}))
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gemma'"):
        load_gguf(path)


def test_missing_metadata(tmp_path):
    md = tiny_metadata()
    del md["llama.block_count"]
    with pytest.raises(ValueError, match="llama.block_count"):
        load_gguf(write_tiny(tmp_path / "m.gguf", md))


def test_unsupported_tokenizer(tmp_path):
    path = write_tiny(tmp_path / "spm.gguf", tiny_metadata(**{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer 'llama'"):
        load_gguf(path)
    path = write_tiny(tmp_path / "pre.gguf", tiny_metadata(**{"tokenizer.ggml.pre": "mystery"}))
    with pytest.raises(ValueError, match="unsupported tokenizer.ggml.pre 'mystery'"):
        load_gguf(path)


def test_unsupported_tensor(tmp_path):
    weights = to_gguf_names(dict(nn.utils.tree_flatten(tiny_model().parameters())))
    weights["blk.0.attn_qkv.weight"] = mx.zeros((96, TINY["hidden"]))
    path = write_tiny(tmp_path / "qkv.gguf", tiny_metadata(), weights)
    with pytest.raises(ValueError, match="unsupported GGUF tensor 'blk.0.attn_qkv.weight'"):
        load_gguf(path)


@pytest.mark.parametrize("tail", [
    os.urandom(64),  # random bytes after the magic
    struct.pack("<IQQ", 3, 2**40, 0),  # a huge tensor count
    struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**50),  # a key longer than the file
    struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", 1) + b"w" + struct.pack("<I", 9),  # 9 dims
    struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 77),  # no such type
])
def test_damaged_headers_are_refused_before_mx_load(tmp_path, tail):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + tail + b"\0" * 40)
    with pytest.raises(ValueError, match="GGUF"):
        read_gguf(path)


def test_the_header_of_the_embedded_model_reads(smollm_path):
    from mlx_kvq.models.gguf import read_metadata

    meta, table = read_metadata(smollm_path, tensors=True)
    assert meta["general.architecture"] == "llama" and "token_embd.weight" in table
