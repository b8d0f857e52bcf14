"""mlx-lm's OpenAI-compatible server with mlx-kvq's caches (``mlx_kvq.server``).

mlx-lm's own classes serve (HTTP handler, request queue, ``BatchGenerator``, LRU prompt
cache); what differs:

* ``ModelProvider`` also loads GGUF files and the embedded model (the default), and
  gives the model our caches (``serve_caches``): every cache mlx-lm builds is quantized. A
  request's model that cannot load leaves the served model in place.
* ``ResponseGenerator`` batches requests continuously with quantized caches (mlx-lm
  serves one request at a time when ``--kv-bits`` is set); rows are ``RowsKVCache`` rows.
* the prompt cache is held to ``--prompt-cache-bytes`` on every insert, counting each
  entry's real (packed) bytes.
* ``APIHandler`` answers a request that would stop mlx-lm's generation thread (an empty
  prompt, non-string stop words, messages that are not role objects, content parts that are
  not objects, tools that are not objects, parts other than text for a text-only model) with a
  400, as it does a request the generation thread refuses
  (``RequestError``: a prompt that fills the model's context, KV over ``--max-kv-memory``),
  and ``/v1/models`` lists the served model even without a Hugging Face cache directory.
* generation ends at the model's context: ``max_tokens`` is cut to what fits after the
  prompt.

Under ``mlx.launch`` (more than one rank) it runs as mlx-lm's server does: every rank loads
its share of the model (``load_sharded``: tensor parallel, or ``--pipeline``), rank 0
alone serves HTTP and shares each request with the other ranks, which run the same
generation loop in lockstep (mlx-lm's ``ResponseGenerator``). Each rank's prompt cache holds
the same entries (``PromptCache``), and rank 0 logs every rank's prompt-cache bytes.
"""

import gc
import json
import logging
import os
import sys
import time
from collections import deque
from pathlib import Path
from queue import Empty as QueueEmpty

import mlx.core as mx

from .. import kernels
from ..bridge import make_logits_processors, make_sampler, mlx_lm_batch_generator, mlx_lm_server, serve_caches
from ..cache import RowsBuffer
from ..models import (check_model_files, default_model_path, fit_to_context, float_dtype, load, load_sharded,
                      prepare_model, reads_gguf)
from ..models.memory import kv_bytes
from .distributed import by_rank_line, ints_by_rank

server = mlx_lm_server()


class ModelProvider(server.ModelProvider):
    """mlx-lm's ``ModelProvider`` that loads GGUF files and the embedded model (when no
    ``--model`` is given) and serves with ``make_prompt_cache(model, **kv_kwargs)``
    (``kv_kwargs=None``: mlx-lm's own caches)."""

    def __init__(self, cli_args, kv_kwargs=None, dtype="auto"):
        super().__init__(cli_args)
        self.kv_kwargs = kv_kwargs
        self.dtype = dtype
        if cli_args.model is None:
            self._model_map["default_model"] = str(default_model_path())

    @property
    def sharding(self):
        """How the model is split over the ranks: ``tensor``, ``pipeline``, or None (one process)."""
        if not self.is_distributed:
            return None
        return "pipeline" if self.pipeline_group is not None else "tensor"

    def key(self, model_path, adapter_path=None, draft_model_path=None):
        """The model key ``load`` serves for a request's names (mlx-lm's maps applied)."""
        return (self._model_map.get(model_path, model_path), self._adapter_map.get(model_path, adapter_path),
                self._draft_model_map.get(draft_model_path, draft_model_path))

    def _load(self, model_path, adapter_path=None, draft_model_path=None):
        """Load a request's model in place of the served one. Where it cannot load, the
        served model stays: its files are looked up before the served model is dropped, and
        a failure after that loads the served model again (mlx-lm's server is left with no
        model, which it loads again at the next request). Not under mlx.launch, where every
        rank loads as mlx-lm's do."""
        served = self.model_key
        if served is None or self.is_distributed:
            return self._swap(model_path, adapter_path, draft_model_path)
        check_model_files(model_path, adapter_path, draft_model_path)
        try:
            self._swap(model_path, adapter_path, draft_model_path)
        except Exception:
            logging.warning("could not load %s: serving %s again", model_path, served[0])
            self._swap(*served)
            raise

    def _swap(self, model_path, adapter_path=None, draft_model_path=None):
        plain = adapter_path is None and draft_model_path is None
        gguf = plain and model_path is not None and reads_gguf(model_path)
        if self.is_distributed and not plain:
            raise ValueError("Loading with adapters or draft models not supported in distributed mode")
        if gguf or self.is_distributed:
            self.reset()
            gc.collect()
            mx.clear_cache()
            if self.is_distributed:
                model, tokenizer, config = load_sharded(
                    model_path, self.sharding, return_config=True, tokenizer_config=self._tokenizer_config,
                    trust_remote_code=self.cli_args.trust_remote_code)
            else:
                (model, tokenizer), config = load(model_path), {}
            if gguf and self.cli_args.chat_template:
                tokenizer._tokenizer.chat_template = self.cli_args.chat_template
            if self.cli_args.use_default_chat_template and tokenizer.chat_template is None:
                tokenizer.chat_template = tokenizer.default_chat_template
            self.model_key = (model_path, adapter_path, draft_model_path)
            self.model, self.tokenizer = model, tokenizer
            self.processor = server.load_processor(model, config)
            self.draft_model = None
            self.is_batchable = True
        else:
            super()._load(model_path, adapter_path, draft_model_path)
        prepare_model(self.model, self.dtype)
        if self.kv_kwargs is not None:
            serve_caches(self.model, **self.kv_kwargs)
            self.is_batchable = batchable(self.model, self.draft_model, self.is_distributed)
            if not self.is_distributed:  # as the probe: a rank failing alone would leave the others waiting
                a = self.cli_args
                warm_up(self.model, self.is_batchable, a.prompt_concurrency, a.decode_concurrency, a.prefill_step_size)


def batchable(model, draft_model=None, distributed=False):
    """Whether requests for ``model`` (with our caches) batch continuously: no draft model,
    caches that merge, and a model whose batched step equals its rows' steps alone
    (``rows_batchable``; not probed under mlx.launch, where a rank that fails alone would
    leave the others waiting)."""
    if draft_model is not None or not all(hasattr(c, "merge") for c in model.make_cache()):
        return False
    modules = {type(m).__module__.rsplit(".", 1)[-1] for m in model.modules()}
    known = sorted(modules & set(UNBATCHED))
    if known:
        logging.warning(f"{known[0]} {UNBATCHED[known[0]]}: requests are served one at a time.")
        return False
    if not distributed and not rows_batchable(model):
        logging.warning("The model's batched step does not match its requests run alone (its own "
                        "attention or positions): requests are served one at a time.")
        return False
    return True


# mlx-lm model modules whose batched requests fail or differ from the same requests alone
# (``tests/cache/test_rows_cache.py``, ``tests/generation/test_serving.py``): named, so that
# they are served one at a time under mlx.launch too, and where the probe cannot see it
UNBATCHED = {
    "deepseek_v32": "gathers mask columns for its indexer's top-k (past the probe's tokens)",
    "glm_moe_dsa": "gathers mask columns for its indexer's top-k (past the probe's tokens)",
    "longcat_flash_ngram": "keeps n-gram context in the batch cache, right padding included",
    "afm7": "takes its reused-cache layers' positions from the longest row",
    "gemma2": "adds a (B, 1, L, T) mask to (B, kv, rep, L, T) scores in its own attention",
    "gpt_bigcode": "takes the cache offset as one number",
    "llama4": "keeps chunked-attention caches, which batch rows do not trim",
    "phi3small": "computes its block-sparse attention over the arrays with a mask of its own",
    "plamo2": "calls mx.fast.scaled_dot_product_attention on the fetched keys itself",
}


PROBE = ([1, 2, 3], [4, 5, 6, 7, 8])  # two rows of different lengths, then one decode step


def rows_batchable(model):
    """Whether ``model`` gives on batch caches of its caches (``RowsKVCache``: attention row
    by row; its arrays left-padded for models that use them) what each row gives alone:
    two rows of different lengths are prefilled alone, merged, and take one decode step
    together, against each row's prompt and step run alone in one piece (every token in the
    unquantized window: no quantization between the two). A model that fails, or gets
    other logits (mask conventions of its own attention, positions taken from the batch's
    longest row), is served one request at a time."""
    try:
        rows = []
        for p in PROBE:
            rows.append(model.make_cache())
            model(mx.array([p]), cache=rows[-1])
        batch = [type(a).merge([a, b]) for a, b in zip(*rows)]
        got = model(mx.array([[9], [9]]), cache=batch)[:, -1].astype(mx.float32)
        ref = mx.concatenate([model(mx.array([p + [9]]), cache=model.make_cache())[:, -1] for p in PROBE])
        ref = ref.astype(mx.float32)
        err, size = mx.abs(got - ref).max().item(), mx.abs(ref).max().item()
    except Exception:  # noqa: BLE001 (any failure: serve one at a time, as mlx-lm does)
        return False
    return err <= PROBE_TOLERANCE * size


WARM_UP = (300, 40)  # prompt lengths of the warm-up rows: past the unquantized window (packed), and short


def warm_up(model, batched=True, prompts=8, rows=16, step=2048):
    """Run once what the first requests run, so that the kernels they launch are compiled at
    load rather than while the first client waits (MLX's JIT on CUDA, ``metal_kernel``
    pipelines on Metal): on GPUs only (on the CPU nothing is compiled), unless
    ``MLX_KVQ_WARM_UP=0``. Returns the seconds it took, or None where it did not run.

    Batched (``batched``), it runs mlx-lm's ``BatchGenerator`` as the server does (``prompts``:
    its prompt concurrency, ``step``: its prefill step): ``prompts`` rows prefilled together
    (one past the unquantized window, so that it packs), then more rows join the running
    batch (up to ``rows``), and the rows leave one step apart, so that the decode step runs
    at every batch size from ``rows`` down to 1. MLX's CUDA backend compiles its quantized
    matmul per tile, chosen by the batch's rows: a warm-up of two rows left the server's
    first 16 requests ~30 s of compiling on a fresh H200 (BENCHMARKS.md, "The same load on a
    GPU"). The rows sample as requests do (greedy; temperature and top-p with a logit bias) and
    their tokens' logprobs are read as the server reads them: MLX's CUDA backend compiles those
    gathers and scatters too. Alone, a prefill that packs and three decode steps."""
    if os.environ.get("MLX_KVQ_WARM_UP", "1") in ("", "0") or not kernels.enabled():
        return None
    t0 = time.perf_counter()
    if batched:
        rows = max(rows, prompts)
        gen = mlx_lm_batch_generator()(model, prefill_batch_size=prompts, prefill_step_size=step,
                                       completion_batch_size=rows)
        lengths = [WARM_UP[0]] + [WARM_UP[1]] * (rows - 1)
        tokens = [[(i + j) % 64 for j in range(n)] for i, n in enumerate(lengths)]
        # each row one token more than the last, the first outlasting the others' prefill
        n = [2 * -(-len(tokens) // prompts) + 2 + i for i in range(len(tokens))]
        # the requests' sampling too (greedy; temperature, top-p and a logit bias), as the
        # server builds it per request, and its read of each token's logprob
        greedy, sample = make_sampler(0.0), make_sampler(0.7, top_p=0.9)
        samplers = [sample if i % 2 else greedy for i in range(len(tokens))]
        biased = [make_logits_processors({1: -100.0}) if i % 2 else [] for i in range(len(tokens))]
        insert = lambda rows: gen.insert([tokens[i] for i in rows], max_tokens=[n[i] for i in rows],
                                         samplers=[samplers[i] for i in rows],
                                         logits_processors=[biased[i] for i in rows])
        insert(range(prompts))
        _served(gen.next_generated())
        insert(range(prompts, len(tokens)))
        done = 0
        while done < len(tokens):
            done += sum(r.finish_reason is not None for r in _served(gen.next_generated()))
        gen.close()
    else:
        cache = model.make_cache()
        mx.eval(model(mx.arange(WARM_UP[0])[None] % 64, cache=cache))
        for _ in range(3):
            mx.eval(model(mx.zeros((1, 1), mx.int32), cache=cache))
    seconds = time.perf_counter() - t0
    logging.info(f"Kernels warmed up in {seconds:.1f} s (MLX_KVQ_WARM_UP=0 skips this).")
    return seconds


def _served(responses):
    """``responses`` after the server's read of each token's logprob."""
    for r in responses:
        r.logprobs[r.token].item()
    return responses


PROBE_TOLERANCE = 0.02  # of the largest logit: batched products round differently in half precision


class PromptCache(server.LRUPromptCache):
    """mlx-lm's LRU prompt cache, held to ``max_bytes`` on every insert. Under mlx.launch an
    entry leaves every rank's cache while any rank is over its byte limit: the ranks'
    bytes differ (a pipeline rank holds its own layers), their entries must not, or a
    request would prefill different tokens on different ranks."""

    def insert_cache(self, model, tokens, prompt_cache, *, cache_type="assistant"):
        limit, self.max_bytes = self.max_bytes, 1 << 63
        try:
            super().insert_cache(model, tokens, prompt_cache, cache_type=cache_type)
        finally:
            self.max_bytes = limit
        self.trim_to(n_bytes=limit)

    def trim_to(self, *, n_sequences=None, n_bytes=None):
        super().trim_to(n_sequences=n_sequences)
        if n_bytes is None or n_bytes >= 1 << 62:  # no limit (the same on every rank)
            return
        while any(ints_by_rank(int(self.nbytes > max(0, n_bytes)))):
            super().trim_to(n_sequences=len(self) - 1)


class RequestError(ValueError):
    """A request the generation thread refuses once it has tokenized or sized it (an empty
    prompt, a prompt that fills the model's context, KV over ``--max-kv-memory``): the
    client's error, answered 400 (mlx-lm answers every error there 404)."""


class ResponseGenerator(server.ResponseGenerator):
    """mlx-lm's ``ResponseGenerator``, batching whatever caches the model makes; under
    mlx.launch rank 0 also logs every rank's prompt-cache bytes.

    ``max_kv_memory`` (bytes, None: no limit): a request joins the batch only while the
    KV caches of the requests in it, each sized for its prompt plus its ``max_tokens``
    (``models.memory.kv_bytes`` in the served cache format), stay within it; the others
    wait in arrival order, and one that could never fit is refused with an error."""

    def __init__(self, model_provider, prompt_cache, max_kv_memory=None):
        self.max_kv_memory = max_kv_memory
        self._waiting = deque()  # (request, bytes) held until their KV fits
        self._held = {}  # response queue (a _Reservation) -> the bytes it holds
        super().__init__(model_provider, prompt_cache)

    def _next_request(self, timeout=None):
        if self.max_kv_memory is None:
            return super()._next_request(timeout)
        request = None
        if not self._is_distributed or self._rank == 0:  # as mlx-lm's: rank 0 takes requests
            request = self._admit(timeout)
        return self._share_request(request)

    def held_kv_bytes(self):
        """The KV bytes the admitted requests hold (their clients still connected)."""
        for r in [r for r in self._held if r.stopped()]:
            self._held.pop(r, None)
        return sum(self._held.values())

    def _admit(self, timeout):
        """The next request whose KV fits beside the admitted ones, or None. A request for
        a model other than the loaded one waits until the admitted requests are done (mlx-lm's
        loop drains its batch before it switches), then loads it and is sized by it."""
        held = self.held_kv_bytes()
        if self._waiting:
            request, need = self._waiting[0]
            if need is None and not held:  # another model's request, the batch done
                self._waiting.popleft()
                return self._place(request, held, first=True)
            if need is not None and need <= self.max_kv_memory - held:
                return self._reserve(*self._waiting.popleft())
            timeout = None  # the batch is running: do not stall it
        try:
            request = self.requests.get(timeout=timeout) if timeout is not None else self.requests.get_nowait()
        except QueueEmpty:
            return None
        return self._place(request, held)

    def _place(self, request, held, first=False):
        """Admit ``request`` (returned), or queue or refuse it (None). ``first``: it was at
        the head of the queue."""
        if held and not self._is_distributed and not self._serves(request[2]):
            self._waiting.append((request, None))  # sized by its own model, once that loads
            return None
        try:
            need = self.request_kv_bytes(request)
        except Exception as e:  # what mlx-lm's loop answers for a request it cannot serve
            request[0].put(e)
            return None
        if need > self.max_kv_memory:
            request[0].put(RequestError(
                f"this request needs {need / 1e6:.1f} MB of KV cache (its prompt plus max_tokens), more than the "
                f"server's --max-kv-memory of {self.max_kv_memory / 1e6:.1f} MB; send fewer tokens or max_tokens"))
            return None
        if (self._waiting and not first) or need > self.max_kv_memory - held:
            self._waiting.append((request, need))
            return None
        return self._reserve(request, need)

    def _serves(self, args):
        """Whether the loaded model is the one ``args`` asks for."""
        p, m = self.model_provider, args.model
        return p.model is not None and p.model_key == p.key(m.model, m.adapter, m.draft)

    def _reserve(self, request, need):
        rqueue, body, args = request
        held = _Reservation(rqueue, self._held)
        self._held[held] = need
        return held, body, args

    def request_kv_bytes(self, request):
        """The KV bytes ``request`` takes at its longest: prompt plus ``max_tokens``, in the
        cache format of the model it asks for (loaded first where it is not: a request's error
        is then its own, as in mlx-lm's loop). Under mlx.launch, where rank 0 admits alone and
        every rank loads together in mlx-lm's loop, the served model sizes it, and with no
        model loaded (after a failed load) it takes the whole limit: it runs alone."""
        _, body, args = request
        provider = self.model_provider
        if not self._serves(args):
            if not self._is_distributed:
                provider.load(args.model.model, args.model.adapter, args.model.draft)
            elif provider.model is None:
                return self.max_kv_memory
        prompt = self._tokenize(provider.tokenizer, body, args)[0]  # may cut args.max_tokens to the context
        tokens = len(prompt) + args.max_tokens
        kv = dict(provider.kv_kwargs or {})
        bits, group = kv.pop("kv_bits", None), kv.pop("kv_group_size", None)
        # unquantized tokens (mlx-lm's caches; our sinks and window) store the model's dtype
        try:
            dense = float_dtype(provider.model).size
            return kv_bytes(vars(provider.model.args), tokens, bits, group, dense_bytes=dense, **kv)
        except Exception as e:
            raise ValueError(f"--max-kv-memory: cannot size this request's KV cache ({e})") from e

    def _log_cache_stats(self):
        super()._log_cache_stats()
        if self._is_distributed:  # every rank gets here at the same step: a collective is safe
            logging.info(by_rank_line("Prompt cache", ints_by_rank(self.prompt_cache.nbytes)))

    def _is_batchable(self, args):
        return self.model_provider.is_batchable and args.seed is None

    def _tokenize(self, tokenizer, request, args):
        """mlx-lm's, refusing an empty prompt and one that fills the model's context
        (``fit_to_context``), and ending generation at the context's end: ``max_tokens`` is
        cut to what fits after the prompt (the response then ends with ``finish_reason``
        "length", as at any ``max_tokens``)."""
        out = super()._tokenize(tokenizer, request, args)
        if not out[0]:
            raise RequestError("The prompt is empty (no tokens).")
        try:
            args.max_tokens = fit_to_context(self.model_provider.model, len(out[0]), args.max_tokens)
        except ValueError as e:
            raise RequestError(f"{e} Send a shorter prompt.") from None
        return out


class _Reservation:
    """A request's response queue that gives back its KV reservation (an entry of
    ``held``) when the request ends: its last response (None) or an error is put, or
    its client is gone (``stopped``)."""

    def __init__(self, rqueue, held):
        self.rqueue, self.held, self.ctx = rqueue, held, None

    def put(self, item, *args, **kwargs):
        if item is None or isinstance(item, Exception):
            self.held.pop(self, None)
        elif isinstance(item, server.GenerationContext):
            self.ctx = item
        self.rqueue.put(item, *args, **kwargs)

    def stopped(self):
        return self.ctx is not None and self.ctx._should_stop

    def __getattr__(self, name):
        return getattr(self.rqueue, name)


class APIHandler(server.APIHandler):
    """mlx-lm's handler, refusing with a 400 the requests its generation thread would die on
    or sample wrong tokens for."""

    # parameters that reach the logits: NaN or infinity there samples a wrong token
    FINITE = ("temperature", "top_p", "min_p", "repetition_penalty", "xtc_probability", "xtc_threshold")

    def validate_model_parameters(self):
        super().validate_model_parameters()
        stop = self.body.get("stop")
        if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)
        ):
            raise ValueError("stop must be a string or a list of strings")
        for name in self.FINITE:  # the logits are float32 at most
            value = getattr(self, name, None)
            if isinstance(value, (int, float)) and not abs(value) <= mx.finfo(mx.float32).max:
                raise ValueError(f"{name} must be a finite float32 number, got {value}")
        if 0 < self.temperature < 1e-30:  # the sampler scales by 1 / temperature
            raise ValueError(f"temperature must be 0 (greedy) or at least 1e-30, got {self.temperature}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be between -2 and 2 (OpenAI's range), got {getattr(self, name)}")
        if self.seed is not None and not 0 <= self.seed < 2**64:  # mx.random.seed's uint64
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if isinstance(self.body.get("max_tokens", 1), bool) or isinstance(self.body.get("max_completion_tokens", 1), bool):
            raise ValueError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.body.get("top_logprobs") is not None and self.top_logprobs < 0:  # mlx-lm's -1: not asked
            raise ValueError(f"top_logprobs must be at least 0, got {self.top_logprobs}")
        n = self.body.get("n", 1)
        if isinstance(n, bool) or n != 1:  # mlx-lm answers one choice whatever n asks
            raise ValueError(f"n must be 1 (the server gives one choice a request), got {n!r}")
        if self.stream_options is not None and not isinstance(self.stream_options, dict):
            raise ValueError("stream_options must be an object")
        if self.logit_bias:
            vocab = vocabulary(self.response_generator.model_provider)
            for token, bias in self.logit_bias.items():
                if token < 0 or (vocab and token >= vocab):
                    ids = f"token ids 0 to {vocab - 1}" if vocab else "token ids from 0"
                    raise ValueError(f"logit_bias token {token} is not in the model's vocabulary ({ids})")
                if not -100 <= bias <= 100:
                    raise ValueError(f"logit_bias of token {token} must be between -100 and 100 (OpenAI's range), "
                                     f"got {bias}")

    def _set_completion_headers(self, status_code=200):
        """mlx-lm's; called with 404 while it handles any error of the generation thread,
        which is 400 where that error is a refused request (``RequestError``)."""
        if status_code == 404 and isinstance(sys.exc_info()[1], RequestError):
            status_code = 400
        super()._set_completion_headers(status_code)

    def handle_text_completions(self):
        prompt = self.body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")
        return super().handle_text_completions()

    def handle_chat_completions(self):
        messages = self.body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
        ):
            raise ValueError("messages must be a non-empty list of objects with a 'role'")
        text_only = self._serves_text_only()
        for m in messages:
            content = m.get("content")
            if content is not None and not isinstance(content, (str, list)):
                raise ValueError(f"a message's content must be a string or a list of parts, "
                                 f"got {type(content).__name__}")
            for part in content if isinstance(content, list) else []:
                if not isinstance(part, dict) or (part.get("type") == "text" and not isinstance(part.get("text"), str)):
                    raise ValueError(f"a content part must be an object with a 'type' (a text part with its "
                                     f"'text' a string), got {part!r}"[:300])
                if text_only and part.get("type") != "text":
                    raise ValueError(f"the served model takes text only; a message has a part of type "
                                     f"{part.get('type')!r}")
            _check_tool_calls(m.get("tool_calls"))
        tools = self.body.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise ValueError("tools must be a list of objects (OpenAI's function tools)")
        kwargs = self.body.get("chat_template_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError("chat_template_kwargs must be an object")
        return super().handle_chat_completions()

    def _serves_text_only(self):
        """Whether the request's model takes text only: the loaded model without an image
        processor, or, not loaded yet (the first request), a GGUF model (``reads_gguf``: they
        load as text models). Its parts other than text are refused in the handler, where
        mlx-lm fetches a request's image URLs first (up to 30 s each, from any address) and its
        generation thread then fails the request with a 404."""
        provider = self.response_generator.model_provider
        key = provider.key(self.requested_model, self.adapter, self.requested_draft_model)
        if provider.model is not None and provider.model_key == key:
            return provider.processor is None
        return key[1] is None and key[2] is None and reads_gguf(key[0])

    def handle_models_request(self):
        """The served model (as ``default_model`` and by its path), then mlx-lm's list of
        models in the Hugging Face cache where there is one."""
        provider = self.response_generator.model_provider
        models = [{"id": "default_model", "object": "model", "created": self.created}]
        path = provider._model_map.get("default_model")
        if path is not None and Path(path).exists():
            models.append({"id": str(Path(path).resolve()), "object": "model", "created": self.created})
        try:
            repos = server.scan_cache_dir().repos
        except Exception:  # no Hugging Face cache directory
            repos = []
        for repo in repos:
            if repo.repo_type == "model" and "main" in repo.refs:
                models.append({"id": repo.repo_id, "object": "model", "created": self.created})
        body = json.dumps({"object": "list", "data": models}).encode()
        self._set_completion_headers(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()


def _check_tool_calls(calls):
    """A message's ``tool_calls`` (None, or a list of objects whose ``function`` is an object
    with JSON ``arguments``): mlx-lm's generation thread parses the arguments and fails the
    request with a 404 where they are not JSON."""
    if calls is None:
        return
    if not isinstance(calls, list):
        raise ValueError(f"a message's tool_calls must be a list, got {type(calls).__name__}")
    for call in calls:
        function = call.get("function", {}) if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise ValueError(f"a message's tool_calls must be objects with a 'function' object, got {call!r}"[:300])
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            try:
                json.loads(arguments)
            except ValueError as e:
                raise ValueError(f"a tool call's arguments must be JSON ({e}): {arguments!r}"[:300]) from None


def vocabulary(provider):
    """How many token ids ``provider``'s model scores: its config's ``vocab_size`` (the
    logits' size), else its tokenizer's tokens with the added ones; None before it loads."""
    n = getattr(getattr(getattr(provider, "model", None), "args", None), "vocab_size", None)
    if isinstance(n, int):
        return n
    hf = getattr(getattr(provider, "tokenizer", None), "_tokenizer", None)
    return len(hf) if hf is not None else None


def run(host, port, model_provider, response_generator=ResponseGenerator, handler=APIHandler):
    """Serve ``model_provider``'s models on ``host:port`` until interrupted (mlx-lm's HTTP
    server); the LRU prompt cache holds ``--prompt-cache-size`` entries and at most
    ``--prompt-cache-bytes`` bytes (on each rank); the batch's KV caches at most
    ``--max-kv-memory``. Under mlx.launch rank 0 serves HTTP and the other ranks follow its
    requests until it stops."""
    args = model_provider.cli_args
    max_bytes = args.prompt_cache_bytes if args.prompt_cache_bytes is not None else 1 << 63
    prompt_cache = PromptCache(args.prompt_cache_size, max_bytes)
    max_kv = getattr(args, "max_kv_memory", None)
    if max_kv is not None:  # requests are sized alone: a batch buffer holds no more than their tokens
        RowsBuffer.spread = 1.0
    generator = response_generator(model_provider, prompt_cache, max_kv)
    group = mx.distributed.init()
    ranks = f" on {group.size()} ranks ({model_provider.sharding} parallel)" if group.size() > 1 else ""
    logging.info("KV caches: %s%s", model_provider.kv_kwargs or "mlx-lm's (fp16)", ranks)
    if group.rank() == 0:
        server._run_http_server(host, port, generator, handler_class=handler)
    else:
        generator.join()
