"""Fidelity of quantized KV caches: perplexity, KL, top-1 agreement and bytes against
fp16 (``fidelity``), needle-in-a-haystack recall (``needle``), over cache config
strings (``configs``). The command is ``python -m mlx_kvq.eval`` (``mlx_kvq.cli.eval``).

    from mlx_kvq.eval import evaluate, needle_test, parse_config
    rows = evaluate(model, tokens, ["fp16", "8", "4", "4:g32:plain"])
"""

from .kv_bytes import cache_bytes, describe_cache, layer_bytes
from .configs import BASELINE, CONFIG_HELP, ConfigError, make_cache, parse_config
from .fidelity import evaluate
from .needle import (
    NEEDLE,
    NEEDLE_ANSWER,
    NEEDLE_DEPTHS,
    fit_haystack,
    generate_greedy,
    insert_needle,
    needle_baseline_misses,
    needle_prompt,
    needle_test,
    recalled,
)
from .report import format_table
from .text import DEFAULT_CONFIGS, DEFAULT_TEXT, TUNING_TEXT, encode, read_text, text_tokens
