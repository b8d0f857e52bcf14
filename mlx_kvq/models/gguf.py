"""GGUF files: the header's metadata (``read_metadata``, no tensors read, and
``gguf_config``, an HF-style config of it), and a whole file (llama architecture,
byte-level BPE vocabulary) loaded as an mlx-lm model (``load_gguf``).

``mx.load`` reads GGUF natively: Q4_0, Q4_1 and Q8_0 tensors come back in MLX's
affine quantized layout (``weight`` uint32, ``scales``, ``biases``, groups of 32),
F16/F32 tensors as plain arrays. The model is mlx-lm's own ``llama.Model`` and the
tokenizer an mlx-lm ``TokenizerWrapper``, so ``mlx_lm.generate`` works as usual.
"""

import re
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..bridge import BPEStreamingDetokenizer, TokenizerWrapper, llama

# GGUF tensor name (within a block, or at the top) -> mlx-lm llama parameter name.
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
CONTROL, USER_DEFINED = 3, 4

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the splits applied before byte-level BPE, as llama.cpp does.
# "digits" splits every digit on its own first (StarCoder-style vocabularies).
PRE_TOKENIZERS = {
    "default": [GPT2_SPLIT],
    "gpt2": [GPT2_SPLIT],
    "smollm": ["digits", GPT2_SPLIT],
    "starcoder": ["digits", GPT2_SPLIT],
    "refact": ["digits", GPT2_SPLIT],
    "codeshell": ["digits", GPT2_SPLIT],
    "llama-bpe": [LLAMA3_SPLIT],
    "llama3": [LLAMA3_SPLIT],
}


GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def is_gguf(path):
    """Whether the file at ``path`` starts with the GGUF magic bytes."""
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read_metadata(path, tensors=False):
    """The key/value metadata of a GGUF file (tensors are not read); with ``tensors``,
    also the tensor table ``{name: (dims, type, offset)}``. Every count, length and type
    is checked against the file, so a damaged or hostile file is a ``ValueError`` here,
    before ``mx.load`` (MLX 0.32 crashes on some: random bytes after the magic, a huge
    tensor count)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:

        def take(n):
            b = f.read(n)
            if len(b) != n:
                raise ValueError(f"{path} is not a valid GGUF file: it ends inside its header.")
            return b

        def unpack(fmt):
            return struct.unpack(fmt, take(struct.calcsize(fmt)))

        def count(n, least, what):
            if n * least > size - f.tell():
                raise ValueError(f"{path} is not a valid GGUF file: {n} {what} cannot fit in {size} bytes.")
            return n

        def string():
            (n,) = unpack("<Q")
            return take(count(n, 1, "string bytes")).decode("utf-8", errors="replace")

        def value(t):
            if t in GGUF_SCALARS:
                return unpack("<" + GGUF_SCALARS[t])[0]
            if t == 8:
                return string()
            if t == 9:
                sub, n = unpack("<IQ")
                return [value(sub) for _ in range(count(n, 1, "array items"))]
            raise ValueError(f"{path} is not a valid GGUF file: unknown value type {t}.")

        if take(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file.")
        version, n_tensors, n_kv = unpack("<IQQ")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3).")
        count(n_tensors, 32, "tensors")
        meta = {}
        for _ in range(count(n_kv, 12, "metadata entries")):
            key = string()
            (t,) = unpack("<I")
            meta[key] = value(t)
        if not tensors:
            return meta
        table = {}
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = unpack("<I")
            if not 1 <= n_dims <= 4:
                raise ValueError(f"{path} is not a valid GGUF file: tensor {name!r} has {n_dims} dims.")
            dims = unpack(f"<{n_dims}Q")
            t, offset = unpack("<IQ")
            if offset > size:
                raise ValueError(f"{path} is not a valid GGUF file: tensor {name!r} starts past its end.")
            table[name] = (dims, t, offset)
    return meta, table


def gguf_config(meta):
    """An HF-style config dict from GGUF metadata."""
    arch = meta.get("general.architecture", "llama")
    get = lambda k, d=None: meta.get(f"{arch}.{k}", d)
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    if heads is None or hidden is None:
        raise ValueError("The GGUF metadata lacks the attention head count or embedding length.")
    return {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads),
        "v_head_dim": get("attention.value_length", None),
        "max_position_embeddings": get("context_length"),
        "sliding_window": get("attention.sliding_window"),
    }


def read_gguf(path):
    """Return ``(weights, metadata)`` of a GGUF file, with clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not is_gguf(path):
        raise ValueError(f"{path} is not a GGUF file (no GGUF magic bytes)")
    try:
        read_metadata(path, tensors=True)  # the header checked before mx.load sees it
    except ValueError as e:
        raise ValueError(f"cannot read GGUF file {path}: {e}") from None
    try:
        return mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise ValueError(f"cannot read GGUF file {path}: {e}") from e


def _value(metadata, key, default=None):
    """A metadata value as a plain Python value (scalars come back as mx.array).

    Without a ``default`` the key is required.
    """
    if key not in metadata:
        if default is None:
            raise ValueError(f"GGUF metadata lacks required key {key!r}")
        return default
    v = metadata[key]
    return v.item() if isinstance(v, mx.array) and v.ndim == 0 else v


def model_args(metadata, weights):
    """Build mlx-lm ``llama.ModelArgs`` from GGUF metadata."""
    arch = _value(metadata, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}: only 'llama' is supported")

    def get(key, default=None):
        return _value(metadata, f"llama.{key}", default)

    hidden = get("embedding_length")
    n_heads = get("attention.head_count")
    head_dim = get("attention.key_length", hidden // n_heads)
    rope_dims = get("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ValueError(
            f"partial RoPE (rope.dimension_count={rope_dims}, head_dim={head_dim}) is unsupported"
        )
    rope_scaling = None
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_scaling = {"type": "linear", "factor": get("rope.scaling.factor")}
    elif scaling_type != "none":
        raise ValueError(f"unsupported RoPE scaling {scaling_type!r}")
    layers, ffn, eps = (
        get("block_count"),
        get("feed_forward_length"),
        get("attention.layer_norm_rms_epsilon"),
    )
    if "token_embd.weight" in weights:
        vocab_size = weights["token_embd.weight"].shape[0]
    else:
        vocab_size = len(_value(metadata, "tokenizer.ggml.tokens"))
    return llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=ffn,
        num_attention_heads=n_heads,
        num_key_value_heads=get("attention.head_count_kv", n_heads),
        head_dim=head_dim,
        rms_norm_eps=eps,
        vocab_size=get("vocab_size", vocab_size),
        rope_theta=get("rope.freq_base", 10000.0),
        # llama.cpp's converter permutes Q/K rows into GGML's interleaved RoPE layout.
        rope_traditional=True,
        rope_scaling=rope_scaling,
        max_position_embeddings=get("context_length", 4096),
        tie_word_embeddings="output.weight" not in weights,
    )


def map_name(name):
    """GGUF tensor name -> mlx-lm name: ``blk.3.attn_q.scales`` -> ``model.layers.3.self_attn.q_proj.scales``."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|scales|biases|bias)", name)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|scales|biases|bias)", name)
    if m and m.group(1) in TOP_NAMES:
        return f"{TOP_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"unsupported GGUF tensor {name!r}")


def quantization(weights):
    """Per-module ``{"group_size", "bits"}`` inferred from the packed shapes.

    ``weight`` is ``(out, in * bits / 32)`` uint32 and ``scales`` is ``(out, in / group_size)``.
    The unpacked ``in`` is that of the float module, which ``nn.quantize`` passes in.
    """
    packed = {
        k[: -len(".scales")]: (weights[k[: -len("scales")] + "weight"], v)
        for k, v in weights.items()
        if k.endswith(".scales")
    }

    def predicate(path, module):
        if path not in packed:
            return False
        w, scales = packed[path]
        in_features = module.weight.shape[-1]
        bits, group_size = 32 * w.shape[-1] // in_features, in_features // scales.shape[-1]
        if bits * in_features != 32 * w.shape[-1] or group_size * scales.shape[-1] != in_features:
            raise ValueError(
                f"cannot infer quantization of {path}: weight {w.shape}, scales {scales.shape}"
            )
        return {"group_size": group_size, "bits": bits}

    return predicate


def load_model(weights, metadata):
    """Build an mlx-lm llama model and load the GGUF tensors into it."""
    args = model_args(metadata, weights)
    weights = {map_name(k): v for k, v in weights.items()}
    model = llama.Model(args)
    nn.quantize(model, class_predicate=quantization(weights))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model


def _pre_tokenizer(pre):
    from tokenizers import Regex, pre_tokenizers

    if pre not in PRE_TOKENIZERS:
        raise ValueError(
            f"unsupported tokenizer.ggml.pre {pre!r}; supported: {sorted(PRE_TOKENIZERS)}"
        )
    steps = []
    for split in PRE_TOKENIZERS[pre]:
        if split == "digits":
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        else:
            steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def load_tokenizer(metadata):
    """Build an mlx-lm ``TokenizerWrapper`` from ``tokenizer.ggml.*`` metadata (byte-level BPE only)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    kind = _value(metadata, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"unsupported GGUF tokenizer {kind!r}: only byte-level BPE ('gpt2') is supported"
        )
    tokens = list(_value(metadata, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _value(metadata, "tokenizer.ggml.merges")]
    types = metadata.get("tokenizer.ggml.token_type")
    types = types.tolist() if types is not None else [1] * len(tokens)

    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=False))
    tok.pre_tokenizer = _pre_tokenizer(_value(metadata, "tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types)
            if k == CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types)
            if k == USER_DEFINED
        ]
    )

    def special(name):
        i = metadata.get(f"tokenizer.ggml.{name}_token_id")
        return tokens[i.item()] if i is not None else None

    bos, eos = special("bos"), special("eos")
    if bos is not None and _value(metadata, "tokenizer.ggml.add_bos_token", False):
        bos_id = metadata["tokenizer.ggml.bos_token_id"].item()
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=special("padding") or eos,
        unk_token=special("unknown"),
        chat_template=metadata.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
    return TokenizerWrapper(hf, BPEStreamingDetokenizer)


def load_gguf(path):
    """Load a llama-architecture GGUF file as ``(model, tokenizer)`` for mlx-lm."""
    weights, metadata = read_gguf(path)
    model_args(metadata, weights)  # validate the architecture before building anything
    tokenizer = load_tokenizer(metadata)
    return load_model(weights, metadata), tokenizer
