"""``load``: GGUF files, mlx-lm models (local or on the Hugging Face Hub), the embedded default;
``find_model``: where ``load`` would read one from; ``check_model_files``: that they are there."""

import os
from pathlib import Path

from ..bridge import fetch_mlx_lm, load_mlx_lm
from .embedded import default_model_path
from .gguf import is_gguf, load_gguf


def load(path_or_repo=None, **kwargs):
    """Load ``(model, tokenizer)`` for mlx-lm.

    - ``None``: the embedded default model (see ``EMBEDDED_MODEL``).
    - a ``.gguf`` file, or a directory holding exactly one and no ``config.json``: ``load_gguf``.
    - an mlx-lm model directory or a Hugging Face repo id: ``mlx_lm.load(path_or_repo, **kwargs)``.
    """
    if path_or_repo is None:
        path_or_repo = default_model_path()
    path = Path(path_or_repo).expanduser()
    if path.is_dir() and reads_gguf(path):
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            found = f"{len(ggufs)} .gguf files" if ggufs else "no .gguf file"
            raise ValueError(
                f"{path} holds {found} and no config.json: "
                "pass a .gguf file or an mlx-lm model directory"
            )
        path = ggufs[0]
    if path.is_file():
        if not is_gguf(path):
            raise ValueError(
                f"{path} is not a GGUF file; "
                "pass a .gguf file, an mlx-lm model directory or a repo id"
            )
        if kwargs:
            raise TypeError(
                f"options {sorted(kwargs)} apply to mlx-lm models only, not to GGUF file {path}"
            )
        return load_gguf(path)

    name = str(path_or_repo)
    _check_path(name, path)
    try:
        return load_mlx_lm(name, **kwargs)
    except Exception as e:
        where = (
            f"directory {name}"
            if path.exists()
            else f"Hugging Face repo {name!r} (no local path of that name)"
        )
        raise RuntimeError(
            f"could not load the mlx-lm model from {where}: {type(e).__name__}: {e}"
        ) from e


def find_model(path_or_repo=None):
    """The local file or directory :func:`load` reads ``path_or_repo`` from, a Hugging Face
    repo's files downloaded first as ``load`` does; an error naming it where there is none."""
    if path_or_repo is None:
        return default_model_path()
    name = str(path_or_repo)
    path = Path(name).expanduser()
    if path.exists():
        return path
    _check_path(name, path)
    try:
        return Path(fetch_mlx_lm(name))
    except Exception as e:
        raise RuntimeError(f"could not find the model {name!r}: no local path of that name, and the "
                           f"Hugging Face Hub gave {type(e).__name__}: {e}") from e


def check_model_files(model, adapters=None, draft=None, names=("model", "adapters", "draft model")):
    """Before anything loads: an error naming what is not there of a model, its adapters and
    its draft model (``find_model``), or adapters or a draft model given with a GGUF model (they
    apply to mlx-lm models). ``names``: how the errors call the three (a command names its flags)."""
    for name, path in ((names[0], model), (names[2], draft)):
        if path is not None:
            try:
                find_model(path)
            except Exception as e:  # FileNotFoundError, or the Hub's error as RuntimeError
                raise FileNotFoundError(f"{name} {path}: {e}") from None
    if adapters is not None and not Path(adapters).expanduser().exists():
        raise FileNotFoundError(f"{names[1]} {adapters}: not found")
    if (adapters or draft) and reads_gguf(model):
        raise ValueError(f"{names[1]} and {names[2]} apply to mlx-lm models (a directory or Hugging Face repo), "
                         f"not the GGUF model {model or '(the embedded model)'}")


def reads_gguf(path_or_repo):
    """Whether :func:`load` takes ``path_or_repo`` as GGUF (the embedded model, a file, or a
    directory with no ``config.json``) rather than as an mlx-lm model."""
    if path_or_repo is None:
        return True
    path = Path(path_or_repo).expanduser()
    return path.is_file() or (path.is_dir() and not (path / "config.json").exists())


def _check_path(name, path):
    """A FileNotFoundError where ``name`` is not there and has a path's shape, not a repo id's."""
    if not path.exists() and _looks_like_path(name):
        raise FileNotFoundError(f"model path not found: {name}")


def _looks_like_path(name):
    """True unless ``name`` has the shape of a Hub repo id (``org/name`` or ``name``)."""
    return (
        name.endswith(".gguf")
        or name.startswith((".", "/", "~"))
        or os.sep != "/"
        and os.sep in name
        or name.count("/") > 1
    )
