"""Where mlx-kvq keeps what it fetches or builds: ``$MLX_KVQ_HOME`` or ``~/.cache/mlx_kvq``."""

import os
from pathlib import Path


def cache_dir():
    """``$MLX_KVQ_HOME`` or ``~/.cache/mlx_kvq``."""
    return Path(os.environ.get("MLX_KVQ_HOME") or Path.home() / ".cache" / "mlx_kvq").expanduser()
