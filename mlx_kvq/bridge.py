"""The one module that imports mlx-lm: everything else reaches mlx-lm through it
(``tests/test_layers.py`` scans the imports).

* ``make_prompt_cache`` builds mlx-lm's cache for a model and swaps its attention
  layers' ``KVCache`` for ``QuantizedKVCache``.
* ``patch`` routes attention for our caches to ``quantized_sdpa``: mlx-lm model
  modules bind ``scaled_dot_product_attention`` from ``mlx_lm.models.base`` at
  import, so the binding is replaced in each module the model uses. The wrapper
  passes everything that is not ours to the original, so patching is harmless
  for other caches and idempotent.
* Our class is registered in ``mlx_lm.models.cache`` so that mlx-lm's
  ``load_prompt_cache`` (which looks classes up there by name) finds it.
* ``fp16_batch_cache``, ``extract_row``, ``empty_fp16_cache``, ``is_fp16_cache`` and
  ``merge_mlx_lm_caches``: the mlx-lm cache classes batched generation uses.
* ``serve_caches`` makes mlx-lm build our caches for a model wherever it builds caches
  (its server, ``BatchGenerator``); ``mlx_lm_server``, ``mlx_lm_server_parser`` and
  ``mlx_lm_batch_generator`` hand mlx-lm's server module, its flags and ``BatchGenerator``
  to ``mlx_kvq.server``.
* mlx-lm's generation, sampling, loading, llama model and tokenizer classes, as the
  other modules use them (``stream_generate``, ``make_sampler``, ``load_mlx_lm``,
  ``fetch_mlx_lm``, ``llama``, ``TokenizerWrapper``, ``BPEStreamingDetokenizer``,
  ``sharded_load``, ``generation_stream``).
"""

import inspect
import os
import sys
import warnings

import mlx.nn as nn
import mlx_lm
import mlx_lm.models.cache as lm_cache
from mlx_lm.models import llama  # noqa: F401  (the GGUF loader builds this architecture)
from mlx_lm.sample_utils import make_logits_processors, make_sampler  # noqa: F401
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper  # noqa: F401
from mlx_lm.generate import generation_stream  # noqa: F401
from mlx_lm.utils import sharded_load  # noqa: F401  (models split over mlx.launch's ranks)
from mlx_lm.utils import _download as fetch_mlx_lm  # noqa: F401  (a model's files, from the Hub if need be)
from mlx_lm.utils import _parse_size as parse_mlx_lm_size  # noqa: F401  (--prompt-cache-bytes as mlx-lm reads it)

from .attention import latent_sdpa, quantized_sdpa, rows_sdpa
from .cache import (KVView, QuantizedChunkedKVCache, QuantizedKVCache, QuantizedRotatingKVCache, RowsView,
                    cache_options, plain, whole, with_holes)

stream_generate = mlx_lm.stream_generate
load_mlx_lm = mlx_lm.load
KVCache = lm_cache.KVCache

# mlx-lm saves a cache's class by name and looks it up in mlx_lm.models.cache, where
# "QuantizedKVCache" is mlx-lm's own class: ours are saved under names of their own.
for _cls in (QuantizedKVCache, QuantizedRotatingKVCache, QuantizedChunkedKVCache):
    if not _cls.__name__.startswith("MlxKvq"):
        _cls.__name__ = _cls.__qualname__ = "MlxKvq" + _cls.__name__
    setattr(lm_cache, _cls.__name__, _cls)


# view class -> attention over it: ``fn(queries, view, scale=, mask=, sinks=)``
ROUTES = {KVView: quantized_sdpa, RowsView: rows_sdpa}


def add_route(view_type, fn):
    """Route attention whose ``keys`` are a ``view_type`` to ``fn`` in patched models
    (``fn(queries, view, scale=..., mask=..., sinks=...)``), as ``KVView`` goes to
    ``quantized_sdpa``."""
    ROUTES[view_type] = fn


def _route(original):
    def scaled_dot_product_attention(queries, keys, values, cache=None, scale=1.0, mask=None, sinks=None):
        mask = with_holes(mask, keys)  # batch rows in one buffer: each row's own keys only
        fn = ROUTES.get(type(keys))
        if fn is None:
            fn = next((f for t, f in ROUTES.items() if isinstance(keys, t)), None)
        if fn is not None and _pair(keys, values):
            return fn(queries, keys, scale=scale, mask=mask, sinks=sinks)
        if isinstance(keys, (KVView, RowsView)) and values is keys:  # MLA: the latent as keys and values
            attend = lambda q, k, v, **kw: original(q, k, v, cache=cache, **kw)
            latent = lambda q, view, **kw: latent_sdpa(q, view, attend, **kw)
            if isinstance(keys, RowsView):
                return rows_sdpa(queries, keys, scale=scale, mask=mask, sinks=sinks, attend=latent)
            return latent(queries, keys, scale=scale, mask=mask, sinks=sinks)
        # anything else (models that cast what they fetched, batch rows used as arrays): the
        # arrays the views and masks stand for, MLX's attention
        keys, values, mask = plain(keys), plain(values), plain(mask)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    scaled_dot_product_attention.mlx_kvq_original = original
    return scaled_dot_product_attention


def _pair(keys, values):
    """Whether ``keys``/``values`` are the key and value views of one cache step."""
    part = getattr(keys, "part", None)
    if part is None:  # a view type of another cache: it stands for both
        return values is keys
    if part != "keys" or getattr(values, "part", None) != "values":
        return False
    if isinstance(keys, RowsView):
        return values.takes is keys.takes
    return values.packed is keys.packed and values.offset == keys.offset


# model modules that use what a cache fetches in ways a view cannot stand in for (mx.*
# functions take only real arrays): their caches return dequantized arrays
ARRAY_MODULES = {
    "mlx_lm.models.plamo": "passes the keys and values to mx.tile",
    "mlx_lm.models.deepseek_v32": "gathers the keys its indexer selects with mx.take_along_axis",
    "mlx_lm.models.phi3small": "computes its block-sparse attention over the arrays (mx.expand_dims, matmul)",
}


def arrays_reason(model, names=None):
    """Why ``model``'s caches must return arrays rather than views (None: views do): a
    model module that computes attention itself (no ``scaled_dot_product_attention`` of
    mlx-lm to route) or hands the fetched keys to ``mx`` functions (``ARRAY_MODULES``).
    ``names``: the model's ``module_names``, where known."""
    for name in sorted(names if names is not None else module_names(model)):
        module = sys.modules.get(name)
        if module is None or not name.startswith("mlx_lm.models."):
            continue
        if name in ARRAY_MODULES:
            return f"{name} {ARRAY_MODULES[name]}"
        try:
            src = inspect.getsource(module)
        except (OSError, TypeError):
            continue
        if "update_and_fetch" not in src and "keys_and_values" not in src:
            continue
        if "mx.fast.scaled_dot_product_attention" in src:
            return f"{name} calls mx.fast.scaled_dot_product_attention itself"
        if getattr(module, "scaled_dot_product_attention", None) is None:
            return f"{name} computes attention itself"
    return None


def module_names(model):
    """The Python modules that ``model``'s modules are defined in; a ``ValueError`` naming what
    ``model`` is where it is not an ``mlx.nn.Module`` with ``layers`` or ``make_cache`` (an
    mlx-lm model, as ``mlx_lm.load`` or ``mlx_kvq.load`` gives it)."""
    if not isinstance(model, nn.Module) or not (hasattr(model, "layers") or hasattr(model, "make_cache")):
        raise ValueError(f"model must be an mlx-lm model (an mlx.nn.Module with layers or make_cache), "
                         f"got {type(model).__name__}.")
    return {type(m).__module__ for m in model.modules()}


def patch(model, names=None):
    """Route attention over our views (``ROUTES``) in every module ``model`` uses (``names``:
    its ``module_names``, where known)."""
    for name in names if names is not None else module_names(model):
        module = sys.modules.get(name)
        f = getattr(module, "scaled_dot_product_attention", None)
        if f is not None and not hasattr(f, "mlx_kvq_original"):
            module.scaled_dot_product_attention = _route(f)
    return model


def make_prompt_cache(
    model,
    kv_bits=4,
    *,
    k_bits=None,
    v_bits=None,
    kv_group_size=None,
    mode="affine",
    quantized_kv_start=0,
    rotate=None,
    sinks=None,
    window=None,
    max_kv_size=None,
    strict=False,
):
    """mlx-lm's prompt cache for ``model`` with quantized attention-layer caches.

    ``kv_bits=None`` (and no ``k_bits``/``v_bits``) leaves mlx-lm's fp16 caches as they are.
    ``KVCache`` layers (also inside a ``CacheList``) become ``QuantizedKVCache``,
    ``RotatingKVCache`` layers (sliding windows, ``max_kv_size``) ``QuantizedRotatingKVCache``,
    ``ChunkedKVCache`` layers (llama4's chunked attention) ``QuantizedChunkedKVCache``;
    state caches (``ArraysCache``: SSM, convolutions) are left as they are. Any other KV cache
    (a model's own cache class, mlx-lm's ``ConcatenateKVCache``) stays fp16 with one warning naming
    its layers and the reason; ``strict=True`` makes that a ``ValueError``.
    """
    return cache_maker(
        model, kv_bits, k_bits=k_bits, v_bits=v_bits, kv_group_size=kv_group_size, mode=mode,
        quantized_kv_start=quantized_kv_start, rotate=rotate, sinks=sinks, window=window,
        max_kv_size=max_kv_size, strict=strict,
    )()


def cache_maker(model, kv_bits=4, *, max_kv_size=None, strict=False, **options):
    """``make_prompt_cache``'s options checked, the model patched and its modules read once:
    returns a function that builds the caches (a server builds them for every request; reading
    the modules of a 30-layer model took 24 ms per request on the H200's host)."""
    if max_kv_size is not None:
        max_kv_size = whole("max_kv_size", max_kv_size, 1)
    names = module_names(model)
    patch(model, names)
    config = cache_options(kv_bits, **options)
    if config is not None:
        QuantizedKVCache(**config)  # validate once, even for a model with no KVCache layers
    arrays = arrays_reason(model, names) is not None
    members = fp16_members(model, names)

    def make():
        caches = _mlx_lm_caches(model, max_kv_size)
        if max_kv_size is not None:
            # mlx-lm ignores max_kv_size for models with their own make_cache (llama, ...): their
            # full-attention layers get the sliding window mlx-lm gives the others (keep=4)
            caches = [lm_cache.RotatingKVCache(max_size=max_kv_size, keep=4) if type(c) is lm_cache.KVCache
                      else c for c in caches]
        if config is None:
            return caches
        left = {}  # reason -> layers left fp16
        caches = [_quantized(c, config, arrays, left, i, members) for i, c in enumerate(caches)]
        for reason, layers in left.items():
            msg = f"caches of layers {layers} stay fp16: {reason}"
            if strict:
                raise ValueError(f"{msg} (strict=True).")
            warnings.warn(f"mlx_kvq: {msg}.", stacklevel=3)
        return caches

    return make


def mlx_lm_quantized_cache(model, bits, group_size):
    """mlx-lm's own ``QuantizedKVCache`` for every layer (the baseline ``mlx_kvq.eval`` compares with)."""
    return [lm_cache.QuantizedKVCache(group_size=group_size, bits=bits) for _ in model.layers]


# CacheList members that model modules use in ways mlx-kvq's caches cannot serve: module ->
# {member: reason} (they stay fp16, with the warning)
FP16_MEMBERS = {
    "mlx_lm.models.deepseek_v32": {1: "the sparse-attention indexer's cache, whose arrays the model sets itself"},
    "mlx_lm.models.minimax_m3_vl": {1: "the sparse-attention indexer's cache, which holds keys without values"},
}


def fp16_members(model, names=None):
    """``{CacheList member: reason}`` for ``model`` (``FP16_MEMBERS`` of its modules, ``names``
    where known)."""
    out = {}
    for name in names if names is not None else module_names(model):
        out.update(FP16_MEMBERS.get(name, {}))
    return out


# mlx-lm KV caches that mlx-kvq leaves fp16, and why
FP16_REASONS = {
    "ConcatenateKVCache": "mlx-lm's ConcatenateKVCache has no quantized cache in mlx-kvq",
}


def _quantized(c, config, arrays=False, left=None, layer=0, members=None):
    """Our cache for an mlx-lm layer cache: KVCache and RotatingKVCache are swapped (also
    inside a CacheList, but for ``members`` {index: reason}); other KV caches are noted in
    ``left`` (reason -> layers)."""
    if type(c) is lm_cache.KVCache:
        q = QuantizedKVCache(**config)
    elif type(c) is lm_cache.RotatingKVCache:
        config = {k: v for k, v in config.items() if k != "sinks"}  # its sinks are ``keep``
        q = QuantizedRotatingKVCache(max_size=c.max_size, keep=c.keep, **config)
    elif type(c) is lm_cache.ChunkedKVCache:
        config = {k: v for k, v in config.items() if k != "sinks"}  # it drops its first tokens too
        q = QuantizedChunkedKVCache(c.chunk_size, **config)
    elif type(c) is lm_cache.CacheList:
        members = members or {}
        for i in members:
            if left is not None and i < len(c.caches):
                left.setdefault(members[i], []).append(layer)
        return lm_cache.CacheList(*(m if i in members else _quantized(m, config, arrays, left, layer)
                                    for i, m in enumerate(c.caches)))
    else:
        if left is not None and not isinstance(c, (lm_cache.ArraysCache, QuantizedKVCache)):
            name = type(c).__name__
            reason = FP16_REASONS.get(name, f"{type(c).__module__}.{name} is a cache class mlx-kvq cannot quantize")
            left.setdefault(reason, []).append(layer)
        return c
    q.fetch_arrays = arrays
    return q


def cache_config(caches):
    """The config of the first quantized cache in a list (mlx-lm's ``QuantizedKVCache``:
    ``{"mlx_lm": "QuantizedKVCache", "bits": .., "group_size": ..}``), or None if it holds none."""
    for c in _flat(caches):
        if isinstance(c, QuantizedKVCache):
            return c.config
        if isinstance(c, lm_cache.QuantizedKVCache):
            return {"mlx_lm": "QuantizedKVCache", "bits": c.bits, "group_size": c.group_size}
    return None


def save_prompt_cache(path, caches, metadata=None):
    """mlx-lm's ``save_prompt_cache``; our caches save their config with their state."""
    lm_cache.save_prompt_cache(str(path), caches, metadata)


def load_prompt_cache(path, model=None, expect=False, return_metadata=False):
    """mlx-lm's ``load_prompt_cache`` with clear errors.

    ``expect``: a config dict (see ``QuantizedKVCache.config``; ``None`` for an fp16
    cache; ``False``, the default, checks nothing) the file must match; ``model``:
    the model it must fit (layer count),
    and which gets patched.
    """
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a prompt cache file.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Prompt cache file not found: {path}")
    try:
        caches, metadata = lm_cache.load_prompt_cache(str(path), return_metadata=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable prompt cache file ({type(e).__name__}: {e}).") from None
    check_prompt_cache(path, caches, model, expect)
    return (caches, metadata) if return_metadata else caches


def check_prompt_cache(path, caches, model=None, expect=False):
    """Raise ``ValueError`` unless the caches loaded from ``path`` fit ``model`` (layer
    count; the model is then patched) and have the KV config ``expect`` (see
    :func:`load_prompt_cache`)."""
    if model is not None:
        n = num_layer_caches(model)
        if len(caches) != n:
            raise ValueError(f"{path} holds a cache for {len(caches)} layers; this model has {n}.")
        patch(model)
        if arrays_reason(model) is not None:
            for c in _flat(caches):
                if isinstance(c, QuantizedKVCache):
                    c.fetch_arrays = True
    if expect is not False:
        found = cache_config(caches)
        if found != expect:
            raise ValueError(
                f"{path} was saved with KV cache config {_describe(found)}, "
                f"but {_describe(expect)} was asked for. Use the same KV flags as when the file was made."
            )


def _flat(caches):
    for c in caches:
        yield from (_flat(c.caches) if isinstance(c, lm_cache.CacheList) else (c,))


def num_layer_caches(model):
    """How many layer caches mlx-lm makes for ``model``."""
    return len(lm_cache.make_prompt_cache(model))


def _describe(config):
    if config is None:
        return "fp16 (not quantized)"
    if "mlx_lm" in config:
        return f"mlx-lm's own QuantizedKVCache (bits={config['bits']}, group_size={config['group_size']})"
    return ", ".join(f"{k}={v}" for k, v in config.items())


# -- mlx-lm's fp16 caches, for mlx_kvq.batch ------------------------------------------


def fp16_batch_cache(model, left_padding):
    """mlx-lm's fp16 ``BatchKVCache`` for each layer of ``model``, rows left-padded by ``left_padding``."""
    return [lm_cache.BatchKVCache(left_padding) for _ in lm_cache.make_prompt_cache(model)]


def extract_row(cache, i):
    """Row ``i`` of an mlx-lm ``BatchKVCache``, padding dropped, as a single-row ``KVCache``."""
    return cache.extract(i)


def empty_fp16_cache():
    """An empty mlx-lm ``KVCache``."""
    return lm_cache.KVCache()


def is_fp16_cache(c):
    """Whether ``c`` is mlx-lm's plain ``KVCache`` (what ``kv_bits=None`` leaves a layer)."""
    return type(c) is lm_cache.KVCache


def merge_mlx_lm_caches(caches):
    """One mlx-lm batch cache from single-row mlx-lm caches of one layer (their ``merge``)."""
    if not hasattr(caches[0], "merge"):
        raise ValueError(f"{type(caches[0]).__name__} layers cannot be batched.")
    return caches[0].merge(list(caches))


# -- mlx-lm's server and BatchGenerator, for mlx_kvq.server --------------------------


def _mlx_lm_caches(model, max_kv_size=None):
    """mlx-lm's ``make_prompt_cache``, blind to the ``make_cache`` that ``serve_caches``
    sets on a model (which builds our caches from these)."""
    if "make_cache" not in vars(model):
        return lm_cache.make_prompt_cache(model, max_kv_size=max_kv_size)
    if hasattr(type(model), "make_cache"):
        return type(model).make_cache(model)
    if max_kv_size is not None:
        return [lm_cache.RotatingKVCache(max_size=max_kv_size, keep=4) for _ in model.layers]
    return [lm_cache.KVCache() for _ in model.layers]


def serve_caches(model, **kv_kwargs):
    """Make every cache mlx-lm builds for ``model`` (its server, ``BatchGenerator``,
    ``stream_generate``) ``make_prompt_cache(model, **kv_kwargs)``: mlx-lm asks a model
    with a ``make_cache`` method for its caches."""
    make = cache_maker(model, **kv_kwargs)  # checks the options now, patches the model
    make()  # strict=True: a layer left fp16 raises now
    model.make_cache = make
    return model


def mlx_lm_server():
    """The ``mlx_lm.server`` module (imported on first use)."""
    import mlx_lm.server

    return mlx_lm.server


def mlx_lm_batch_generator():
    """mlx-lm's ``BatchGenerator`` class."""
    from mlx_lm.generate import BatchGenerator

    return BatchGenerator


def mlx_lm_server_parser():
    """The parser ``mlx_lm.server``'s ``main`` builds (its flags, defaults and help), caught
    before it parses anything."""
    import argparse
    import types

    server = mlx_lm_server()

    class Caught(Exception):
        pass

    class Parser(argparse.ArgumentParser):
        def parse_args(self, *args, **kwargs):
            raise Caught(self)

    shim = types.SimpleNamespace(**{k: getattr(argparse, k) for k in dir(argparse) if not k.startswith("__")})
    shim.ArgumentParser = Parser
    original = server.argparse
    server.argparse = shim
    try:
        server.main()
    except Caught as e:
        parser = e.args[0]
    finally:
        server.argparse = original
    parser.__class__ = argparse.ArgumentParser
    return parser
