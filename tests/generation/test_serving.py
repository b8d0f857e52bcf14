"""The server in one process. Its KV memory limit (``ResponseGenerator(max_kv_memory=...)``):
which requests join the batch, which wait and in what order, when a reservation is given
back, and the refusal of a request that could never fit (the generation thread is not
started: the admission is driven directly, with each request's KV bytes given). Its prompt
cache: held to its byte limit as mlx-lm's own LRU cache holds it, and, under mlx.launch,
emptied on every rank while any rank is over."""

from collections import deque
from queue import Queue
from types import SimpleNamespace

import mlx.core as mx
import pytest

from helpers import tiny
from mlx_kvq import kernels
from mlx_kvq.bridge import serve_caches
from mlx_kvq.generation import distributed, serving
from mlx_kvq.generation.distributed import by_rank_line
from mlx_kvq.generation.serving import ResponseGenerator, server


def generator(limit, sizes):
    g = object.__new__(ResponseGenerator)  # no generation thread
    g.max_kv_memory, g._waiting, g._held, g.requests = limit, deque(), {}, Queue()
    g._is_distributed, g._rank = False, 0
    g.request_kv_bytes = lambda request: sizes[request[1]]
    g._serves = lambda args: True  # one model
    return g


def send(g, name):
    q = Queue()
    g.requests.put((q, name, SimpleNamespace(max_tokens=8)))
    return q


def test_requests_wait_in_order_until_their_kv_fits():
    g = generator(100, dict(a=60, b=50, c=30))
    qa, qb, qc = send(g, "a"), send(g, "b"), send(g, "c")
    rq, body, _ = g._next_request()
    assert body == "a" and g.held_kv_bytes() == 60
    assert g._next_request() is None and g._next_request() is None  # b does not fit; c waits behind it
    assert [r[0][1] for r in g._waiting] == ["b", "c"]
    rq.put("token")
    assert qa.get_nowait() == "token"  # the reservation passes responses through
    rq.put(None)  # a's last response: its 60 bytes come back
    assert qa.get_nowait() is None and g.held_kv_bytes() == 0
    assert g._next_request()[1] == "b" and g._next_request()[1] == "c"
    assert g.held_kv_bytes() == 80 and not g._waiting
    assert qb.empty() and qc.empty()


def test_an_error_or_a_gone_client_gives_the_reservation_back():
    g = generator(100, dict(a=70, b=70))
    send(g, "a"), send(g, "b")
    rq = g._next_request()[0]
    assert g._next_request() is None
    rq.put(ValueError("bad request"))
    rq2 = g._next_request()[0]
    assert g.held_kv_bytes() == 70
    ctx = server.GenerationContext(has_tool_calling=False, has_thinking=False, tool_parser=None, text_sm=None,
                                   initial_state=None, prompt=[1], prompt_cache_count=0)
    rq2.put(ctx)
    assert g.held_kv_bytes() == 70
    ctx.stop()  # the client disconnected: mlx-lm drops the row without a last response
    assert g.held_kv_bytes() == 0


def test_a_request_that_could_never_fit_is_refused():
    g = generator(100, dict(big=101, small=10))
    qbig, _ = send(g, "big"), send(g, "small")
    assert g._next_request() is None
    err = qbig.get_nowait()
    assert isinstance(err, ValueError) and "--max-kv-memory" in str(err) and "0.0 MB" in str(err)
    assert g._next_request()[1] == "small"


def test_no_limit_is_mlx_lms_queue():
    g = generator(None, {})
    send(g, "a")
    assert g._next_request(timeout=1)[1] == "a" and not g._held


@pytest.mark.parametrize("extra", [dict(k_bits=8, v_bits=4), dict(sinks=0, window=64), dict(mode="mxfp4"),
                                   dict(quantized_kv_start=1000), dict(max_kv_size=128)])
def test_request_bytes_follow_the_served_format(extra):
    """A request's bytes are the plan's ``kv_bytes`` of its prompt plus max_tokens, in the
    served cache options (mlx-lm's names, as ``make_prompt_cache`` takes them)."""
    from mlx_kvq.models.memory import kv_bytes

    g = generator(None, {})
    del g.request_kv_bytes
    config = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_size=256)
    import mlx.nn as nn

    model = nn.Linear(4, 4)
    model.set_dtype(mx.float16)
    model.args = SimpleNamespace(**config)
    g.model_provider = SimpleNamespace(
        tokenizer=None, kv_kwargs=dict(kv_bits=4, kv_group_size=None, **extra), model=model)
    g._tokenize = lambda tokenizer, body, args: (list(range(body)),)
    need = g.request_kv_bytes((None, 300, SimpleNamespace(max_tokens=20)))
    assert need == kv_bytes(config, 320, 4, **extra) > 0


def test_serving_counts_the_models_dtype_for_unquantized_tokens():
    """Unquantized tokens (mlx-lm's caches, mlx-kvq's sinks and window) hold the model's
    dtype: without KV quantization a float32 model's request takes twice the fp16 bytes,
    and with it its window takes twice its fp16 bytes."""
    import mlx.nn as nn

    from mlx_kvq.models.memory import kv_bytes

    g = generator(None, {})
    del g.request_kv_bytes
    config = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_size=256)
    model = nn.Linear(4, 4)
    model.args = SimpleNamespace(**config)
    g._tokenize = lambda tokenizer, body, args: (list(range(body)),)
    for kv, size in ((None, 4), (dict(kv_bits=None, max_kv_size=64), 4)):
        g.model_provider = SimpleNamespace(tokenizer=None, kv_kwargs=kv, model=model)
        cap = (kv or {}).get("max_kv_size")
        assert g.request_kv_bytes((None, 100, SimpleNamespace(max_tokens=0))) == kv_bytes(
            config, 100, max_kv_size=cap) * size // 2
    g.model_provider = SimpleNamespace(tokenizer=None, kv_kwargs=dict(kv_bits=4, window=64, sinks=0), model=model)
    q32 = g.request_kv_bytes((None, 100, SimpleNamespace(max_tokens=0)))
    window = 2 * 2 * 64 * 2 * (64 + 64)  # layers, heads, tokens, bytes, key and value dims
    assert q32 == kv_bytes(config, 100, 4, window=64, sinks=0) + window
    model.set_dtype(mx.bfloat16)
    g.model_provider = SimpleNamespace(tokenizer=None, kv_kwargs=None, model=model)
    assert g.request_kv_bytes((None, 100, SimpleNamespace(max_tokens=0))) == kv_bytes(config, 100)


def test_a_prompt_that_fills_the_context_is_refused_and_generation_ends_at_it(monkeypatch):
    """After mlx-lm's tokenizing: a prompt of the model's context or more is a
    ``RequestError`` naming both lengths; a request whose ``max_tokens`` runs past the context
    has it cut to what fits (and is sized by that under ``--max-kv-memory``); a model whose
    config states no context is left as mlx-lm serves it."""
    import mlx.nn as nn

    from mlx_kvq.models.memory import kv_bytes

    monkeypatch.setattr(server.ResponseGenerator, "_tokenize",
                        lambda self, tokenizer, body, args: (list(range(body)), [], [], None, None))
    g = generator(None, {})
    del g.request_kv_bytes
    config = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_size=256,
                  max_position_embeddings=512)
    model = nn.Linear(4, 4)
    model.args = SimpleNamespace(**config)
    g.model_provider = SimpleNamespace(tokenizer=None, kv_kwargs=None, model=model)
    for n in (512, 600):
        with pytest.raises(serving.RequestError, match=f"takes {n} tokens; the model's context is 512"):
            g._tokenize(None, n, SimpleNamespace(max_tokens=8))
    with pytest.raises(serving.RequestError, match="empty"):
        g._tokenize(None, 0, SimpleNamespace(max_tokens=8))
    for n, asked, kept in ((511, 8, 1), (500, 100, 12), (500, 12, 12), (10, 8, 8)):
        args = SimpleNamespace(max_tokens=asked)
        assert len(g._tokenize(None, n, args)[0]) == n and args.max_tokens == kept
    args = SimpleNamespace(max_tokens=10**6)
    assert g.request_kv_bytes((None, 100, args)) == kv_bytes(config, 512) * 2  # float32 model
    assert args.max_tokens == 412
    del model.args.max_position_embeddings
    args = SimpleNamespace(max_tokens=10**6)
    g._tokenize(None, 600, args)
    assert args.max_tokens == 10**6


def test_a_request_for_another_model_waits_for_the_batch_and_is_sized_by_its_model():
    """A request naming a model other than the loaded one waits, and the requests after it,
    while admitted requests run (mlx-lm's loop drains its batch before it switches models);
    then its model loads and its KV is sized by that model, not the one that was served."""
    import mlx.nn as nn

    from mlx_kvq.models.memory import kv_bytes

    def model(layers):
        m = nn.Linear(4, 4)
        m.args = SimpleNamespace(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=64, hidden_size=256)
        return m

    models = {"served.gguf": model(2), "other.gguf": model(8)}
    cli = SimpleNamespace(model="served.gguf", adapter_path=None, draft_model=None, pipeline=False,
                          trust_remote_code=False, chat_template=None)
    provider = serving.ModelProvider(cli, kv_kwargs=dict(kv_bits=4, kv_group_size=None))
    loads = []

    def load(path, adapter=None, draft=None):
        loads.append(path)
        provider.model_key, provider.model = (path, adapter, draft), models[path]

    provider._load = load
    provider.load("default_model")
    g = generator(1 << 30, {})
    del g.request_kv_bytes, g._serves
    g.model_provider = provider
    g._tokenize = lambda tokenizer, body, args: (list(range(body)),)

    def ask(name, tokens):
        q = Queue()
        names = SimpleNamespace(model=name, adapter=None, draft=None)
        g.requests.put((q, tokens, SimpleNamespace(max_tokens=0, model=names)))
        return q

    size = lambda name, tokens: kv_bytes(vars(models[name].args), tokens, 4, dense_bytes=4)  # float32 models
    ask("default_model", 100), ask("other.gguf", 200), ask("served.gguf", 300)
    first = g._next_request()
    assert first[1] == 100 and g.held_kv_bytes() == size("served.gguf", 100)
    assert g._next_request() is None and g._next_request() is None
    assert loads == ["served.gguf"] and [r[0][1] for r in g._waiting] == [200, 300]
    first[0].put(None)  # the served model's request is done
    second = g._next_request()
    assert second[1] == 200 and loads == ["served.gguf", "other.gguf"]
    assert g.held_kv_bytes() == size("other.gguf", 200) != size("served.gguf", 200)
    third = g._next_request()  # sized while its model was loaded (mlx-lm's loop runs it once the batch drains)
    assert third[1] == 300 and loads[-1] == "other.gguf"
    ask("default_model", 50)  # sized only once its model is back
    assert g._next_request() is None and loads[-1] == "other.gguf"
    second[0].put(None), third[0].put(None)
    assert g._next_request()[1] == 50 and loads[-1] == "served.gguf"
    assert g.held_kv_bytes() == size("served.gguf", 50)


def test_under_mlx_launch_admission_loads_nothing():
    """Rank 0 admits alone under mlx.launch and every rank loads in mlx-lm's loop: a request
    for another model is sized by the served one (no load, no wait), and with no model
    loaded a request takes the whole limit (it runs alone)."""
    import mlx.nn as nn

    from mlx_kvq.models.memory import kv_bytes

    model = nn.Linear(4, 4)
    model.args = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                 hidden_size=256)
    provider = SimpleNamespace(model=model, model_key=("served", None, None), tokenizer=None,
                               kv_kwargs=dict(kv_bits=4), key=lambda m, a=None, d=None: (m, a, d),
                               load=lambda *a: pytest.fail("rank 0 loaded a model alone"))
    g = generator(1 << 30, {})
    del g.request_kv_bytes, g._serves
    g.model_provider, g._is_distributed = provider, True
    g._tokenize = lambda tokenizer, body, args: (list(range(body)),)
    names = lambda name: SimpleNamespace(max_tokens=0, model=SimpleNamespace(model=name, adapter=None, draft=None))
    for name, tokens in (("served", 100), ("other", 200)):
        g.requests.put((Queue(), tokens, names(name)))
    g._next_request(), g._next_request()
    assert g.held_kv_bytes() == kv_bytes(vars(model.args), 100, 4, dense_bytes=4) + kv_bytes(
        vars(model.args), 200, 4, dense_bytes=4)
    provider.model = None
    assert g.request_kv_bytes((None, 50, names("served"))) == 1 << 30


# -- the prompt cache ------------------------------------------------------------


class Entry:
    """A one-layer prompt cache of ``nbytes`` bytes (not trimmable: entries never merge)."""

    def __init__(self, nbytes):
        self.nbytes = nbytes

    def is_trimmable(self):
        return False


def fill(cache, sizes):
    for i, n in enumerate(sizes):
        cache.insert_cache("m", [i, i + 1], [Entry(n)])
    return cache


def keys(cache):
    return sorted(tokens[0] for lru in cache._lru._lrus.values() for _, tokens in lru)


def test_one_process_keeps_what_mlx_lms_cache_keeps():
    sizes = [300, 500, 200, 400, 100, 600]
    for limit, count in [(1000, 10), (700, 10), (10**6, 3), (0, 10)]:
        ours = fill(serving.PromptCache(count, limit), sizes)
        theirs = fill(server.LRUPromptCache(count, limit), sizes)
        assert keys(ours) == keys(theirs) and ours.nbytes == theirs.nbytes, (limit, count)
        ours.trim_to(n_bytes=limit // 2)
        theirs.trim_to(n_bytes=limit // 2)
        assert keys(ours) == keys(theirs), limit


def test_every_rank_evicts_while_any_rank_is_over(monkeypatch):
    """Another rank holds twice these bytes (a pipeline rank with more layers): the entries
    it must drop leave this rank's cache too."""
    def over_on_a_rank(value, group=None, stream=None):
        return [value, int(2 * cache.nbytes > cache.max_bytes)]

    cache = serving.PromptCache(10, 1000)
    monkeypatch.setattr(serving, "ints_by_rank", over_on_a_rank)
    fill(cache, [300, 200, 100])  # here 600 bytes, there 1200: the oldest leaves
    assert keys(cache) == [1, 2] and cache.nbytes == 300


def test_ints_and_line_by_rank():
    assert distributed.ints_by_rank(5 << 40) == [5 << 40]  # one process: no collective
    assert by_rank_line("KV cache", [3 << 20, 1 << 20]) == "KV cache per rank: 3.00, 1.00 MiB; total 4.00 MiB over 2 ranks"
    assert by_rank_line("Prompt cache", [18432, 18432]) == (
        "Prompt cache per rank: 18.00, 18.00 KiB; total 36.00 KiB over 2 ranks")


@pytest.mark.parametrize("name,batched", [("llama", True), ("gemma3_text", True), ("deepseek_v3", True),
                                          ("phi", True), ("gemma2", False), ("afm7", False), ("llama4", False),
                                          ("deepseek_v32", False), ("longcat_flash_ngram", False)])
def test_models_whose_batched_step_differs_are_served_one_at_a_time(name, batched):
    """A model batches when its batched step gives its rows' logits alone: MLA models and
    models that cast what they fetch do (the rows' arrays left-padded, ``RowsMask`` as the
    array mask); gemma2 (its own attention adds a (B, 1, L, T) mask to (B, kv, rep, L, T)
    scores) and afm7 (its reused-cache layers take RoPE positions from the longest row) do
    not, nor does llama4 (its chunked caches); deepseek_v32 and longcat_flash_ngram differ past
    what the probe sees. They are named in ``serving.UNBATCHED`` and served one request at a
    time, as mlx-lm serves quantized caches; the probe refuses gemma2, afm7 and llama4 itself."""
    model = serve_caches(tiny(name), kv_group_size=32)
    assert serving.batchable(model) is batched
    if name in ("gemma2", "afm7", "llama4"):
        assert not serving.rows_batchable(model)
    assert serving.batchable(model, draft_model=object()) is False
    # no probe under mlx.launch: the modules named in UNBATCHED stay one at a time there too
    assert serving.batchable(model, distributed=True) is (name not in serving.UNBATCHED)


class Recording:
    """A launcher that records the kernels launched and returns zeros of their output shapes."""

    def __init__(self):
        self.names = set()
        self.decode_rows = set()  # the batch sizes the decode kernel ran at

    def __call__(self, name, inputs, template, grid, threadgroup, shapes, dtypes):
        self.names.add(name)
        if name.startswith("sdpa_decode"):
            self.decode_rows.add(inputs[0].shape[0])
        return [mx.zeros(s, d) for s, d in zip(shapes, dtypes)]


@pytest.mark.parametrize("batched", [True, False])
def test_warm_up_launches_the_first_requests_kernels(run_kernels_on, monkeypatch, batched):
    """At load the server runs once what its first requests run on a GPU: prefills that pack,
    decode steps over a packed run (the decode kernel) that write the window (its kernel),
    batched at every batch size up to the decode concurrency (rows join a running batch and
    leave one by one); on the CPU and with MLX_KVQ_WARM_UP=0, nothing."""
    model = serve_caches(tiny("llama", hidden_size=256), kv_bits=4, kv_group_size=32)  # head dim 64
    if not kernels.enabled():
        assert serving.warm_up(model, batched) is None  # the CPU: nothing to compile
    launch = Recording()
    run_kernels_on(launch)
    monkeypatch.setenv("MLX_KVQ_WARM_UP", "0")
    assert serving.warm_up(model, batched) is None and not launch.names
    monkeypatch.delenv("MLX_KVQ_WARM_UP")
    used = set()  # the requests' sampling that ran: (temperature, ...), "logit bias"
    sampler, processors = serving.make_sampler, serving.make_logits_processors
    monkeypatch.setattr(serving, "make_sampler", lambda *a, **k: _noting(used, a, sampler(*a, **k)))
    monkeypatch.setattr(serving, "make_logits_processors", lambda *a, **k: [
        _noting(used, "logit bias", f) for f in processors(*a, **k)])
    assert serving.warm_up(model, batched, prompts=2, rows=5) > 0
    assert any(n.startswith("sdpa_decode") for n in launch.names), launch.names
    assert launch.decode_rows == (set(range(1, 6)) if batched else {1}), launch.decode_rows
    assert "window_append" in launch.names, launch.names
    assert used == ({(0.0,), (0.7,), "logit bias"} if batched else set()), used


def _noting(used, what, f):
    """``f``, noting ``what`` in ``used`` when it is called."""
    def noted(*a):
        used.add(what)
        return f(*a)
    return noted


def test_vocabulary_is_the_logits_size():
    """A logit bias may name any token the model scores: its config's vocab_size (Llama 3:
    128256, where its tokenizer's vocab_size, 128000, leaves out the added special tokens),
    else the tokenizer's tokens with the added ones."""
    model = SimpleNamespace(args=SimpleNamespace(vocab_size=12))
    provider = SimpleNamespace(model=model, tokenizer=SimpleNamespace(_tokenizer=[0] * 14, vocab_size=8))
    assert serving.vocabulary(provider) == 12
    provider.model = SimpleNamespace()  # no config
    assert serving.vocabulary(provider) == 14
    assert serving.vocabulary(SimpleNamespace(model=None, tokenizer=None)) is None


def test_text_only_is_known_before_the_model_loads(tmp_path):
    """The handler refuses parts other than text for a model that takes text only: the loaded
    model without an image processor, or, before any model loads, a GGUF file; an mlx-lm
    model directory that has not loaded yet, or one with adapters, is left to mlx-lm."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    provider = SimpleNamespace(model=None, model_key=None, processor=None,
                               key=lambda m, a=None, d=None: ({"default_model": str(gguf)}.get(m, m), a, d))
    handler = object.__new__(serving.APIHandler)
    handler.response_generator = SimpleNamespace(model_provider=provider)

    def text_only(model, adapter=None):
        handler.requested_model, handler.adapter, handler.requested_draft_model = model, adapter, None
        return handler._serves_text_only()

    assert text_only("default_model") and text_only(str(gguf))
    assert not text_only(str(hf)) and not text_only(str(gguf), adapter="a")
    provider.model, provider.model_key = object(), (str(hf), None, None)
    assert text_only(str(hf))  # loaded, no image processor
    provider.processor = object()
    assert not text_only(str(hf)) and text_only("default_model")
