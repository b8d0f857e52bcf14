"""Models: loading (GGUF files, mlx-lm models, the embedded default), what the commands
ask of a loaded model, and how much memory a model and its cache take."""

from .embedded import EMBEDDED_MODEL, default_model_path
from .gguf import load_gguf, read_gguf
from .info import context_length, fit_to_context, float_dtype, model_fingerprint, prepare_model, to_fp32
from .loading import check_model_files, find_model, load, reads_gguf
from .sharded import MODES, load_sharded, mark_sharded, sharding
