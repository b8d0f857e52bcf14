"""The mlx_kvq.generate CLI end to end on the embedded model."""

import subprocess
import sys

import pytest

from mlx_kvq.cli import generate


def run(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_kvq.cli.generate", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_answers_and_reports_memory(smollm_path):
    r = run("-p", "What is the capital of France?", "-m", "24", "--kv-bits", "4", "--kv-window", "0")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    for field in ("Prompt:", "tokens-per-sec", "Generation:", "Peak memory:", "KV cache:", "would take"):
        assert field in r.stdout
    ratio = float(r.stdout.split("MB = ")[1].split("x")[0])
    assert ratio < 0.5


def test_cli_reads_prompt_from_stdin_and_compares_fp16(smollm_path):
    r = run("-p", "-", "-m", "8", "--no-kv-quant", "--ignore-chat-template", stdin="Once upon a time")
    assert r.returncode == 0, r.stderr
    assert "= 1.00x" in r.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--kv-bits", "7"], "bits 7"),
        (["--kv-group-size", "48"], "group size 48"),
        (["--kv-mode", "int3"], "mode 'int3'"),
        (["--model", "/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
        (["--prompt-cache-file", "/nonexistent.safetensors"], "not found"),
        (["-p", "   "], "prompt is empty"),
    ],
)
def test_cli_bad_input_is_a_clear_error(smollm_path, args, message):
    r = run("-m", "2", *args)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr


def test_a_prompt_past_the_models_context_is_a_clear_error(smollm_path):
    """SmolLM2's context is 8192 tokens: a longer prompt is refused before any prefill,
    naming both lengths."""
    r = run("-p", "-", "-m", "4", "--ignore-chat-template", stdin="The river runs past the mill. " * 1400)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "tokens; the model's context is 8192 tokens" in r.stderr and "mlx_kvq.summarize" in r.stderr
    assert int(r.stderr.split("takes ")[1].split()[0]) > 8192


def test_max_tokens_past_the_context_is_cut_and_said(fast_smollm, monkeypatch, capsys):
    """With the model's context at 40 positions, ``-m 30`` after a prompt of 13 tokens
    generates at most the 27 that fit, and stderr says so; its text begins as the same
    prompt's greedy answer with the full context."""
    model, tokenizer = fast_smollm
    monkeypatch.setattr(generate, "load_model", lambda args, path=None: (model, tokenizer))
    argv = ["-p", "Once upon a time, in a small village by the sea,", "--ignore-chat-template", "--temp", "0"]
    answer = lambda out: out.split("=" * 10)[1].strip()
    generate.main(argv + ["-m", "12"])
    full = capsys.readouterr().out
    assert "Generation: 12 tokens" in full
    monkeypatch.setattr(model.args, "max_position_embeddings", 40)
    prompt = len(tokenizer.encode(argv[1]))
    generate.main(argv + ["-m", "30"])
    out, err = capsys.readouterr()
    assert f"generating at most {40 - prompt} tokens: the model's context is 40 tokens" in err
    n = int(out.split("Generation: ")[1].split()[0])
    assert 12 <= n <= 40 - prompt < 30
    assert answer(out).startswith(answer(full))


def test_kv_flags_map_to_cache_arguments():
    args = generate.setup_arg_parser().parse_args(
        ["--k-bits", "8", "--v-bits", "4", "--kv-rotate", "none", "--kv-window", "64"]
    )
    kw = generate.cache_kwargs(args)
    assert kw["k_bits"] == 8 and kw["v_bits"] == 4 and kw["rotate"] is False and kw["window"] == 64
    assert generate.cache_kwargs(generate.setup_arg_parser().parse_args(["--no-kv-quant"])) is None


def test_bad_kv_flags_and_a_missing_cache_file_fail_before_the_model_loads(monkeypatch, capsys):
    """The model is not loaded at all (load would raise) when the flags are wrong."""
    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(generate, "load_model", no_load)
    for argv, named in ((["--kv-bits", "7"], "bits 7"), (["--kv-group-size", "48"], "group size 48"),
                        (["--prompt-cache-file", "/nonexistent/c.safetensors"], "not found")):
        with pytest.raises(SystemExit) as e:
            generate.main(["-p", "hi", *argv])
        assert named in str(e.value)


@pytest.mark.parametrize("argv, named", [
    (["--temp", "-1"], "--temp"), (["--top-p", "2"], "--top-p"), (["--max-tokens", "-1"], "--max-tokens"),
    (["--top-k", "-3"], "--top-k"), (["--min-p", "1.5"], "--min-p"), (["--max-kv-size", "0"], "--max-kv-size"),
    (["--prefill-step-size", "0"], "--prefill-step-size"), (["--temp", "nan"], "--temp"),
    (["--prompt-cache", "f.safetensors"], "--prompt-cache"),  # no abbreviations: not --prompt-cache-file
])
def test_numbers_out_of_range_and_abbreviations_are_refused(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        generate.setup_arg_parser().parse_args(argv)
    assert e.value.code == 2 and named in capsys.readouterr().err


def test_sampling_and_window_flags_reach_the_sampler_and_the_cache():
    import mlx.core as mx
    from mlx_lm.models import llama

    from mlx_kvq import QuantizedRotatingKVCache
    from mlx_kvq.cli.args import build_cache, cache_kwargs, check_kv

    args = generate.setup_arg_parser().parse_args(
        ["--top-k", "5", "--min-p", "0.1", "--min-tokens-to-keep", "2", "--max-kv-size", "64", "--kv-bits", "8"])
    assert (args.top_k, args.min_p, args.min_tokens_to_keep, args.prefill_step_size) == (5, 0.1, 2, 2048)
    kv = check_kv(cache_kwargs(args))
    model = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2,
                                        intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                                        rms_norm_eps=1e-5, vocab_size=100))
    caches = build_cache(model, kv)
    assert all(isinstance(c, QuantizedRotatingKVCache) and c.max_size == 64 for c in caches)
    fp = generate.setup_arg_parser().parse_args(["--no-kv-quant", "--max-kv-size", "64"])
    assert all(c.max_size == 64 and type(c).__name__ == "RotatingKVCache"
               for c in build_cache(model, check_kv(cache_kwargs(fp))))
    mx.eval(mx.zeros(1))
