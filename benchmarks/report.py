"""JSON and PNG output shared by the benchmark scripts.

    write_json(rows, "out.json", meta)            # {"meta": {...}, "rows": [...]}
    plot(rows, "keys", ["kernel_ms", "sdpa_ms"], "out.png", "decode attention")

``rows`` is a list of flat dicts, one per measurement (a failed one may hold ``error``
instead of the numbers: plots skip it). Import it as ``from report import ...`` in a script
run as ``python3 benchmarks/<script>.py``, and as ``from .report import ...`` in the package
(``mlx_kvq.benchmarks``). Neither mlx nor matplotlib is imported until a function needs
them, so importing this module before ``mlx_kvq`` does not undo its OpenBLAS preload.
"""

import datetime
import json
import math
import numbers
import platform
import shlex
import sys
from pathlib import Path

MATPLOTLIB_MISSING = ("plotting needs matplotlib: pip install matplotlib "
                      "(or the 'plot' extra: pip install 'mlx-kvq[plot]')")


def device_string():
    """The default MLX device and what ``mx.device_info`` says about it, e.g.
    ``"Device(gpu, 0): NVIDIA H100 80GB HBM3 (sm_90)"``."""
    import mlx.core as mx

    dev = mx.default_device()
    try:
        info = mx.device_info(dev)
    except Exception:  # older mlx, or a backend without it
        info = {}
    name = info.get("device_name")
    arch = info.get("architecture")
    out = str(dev)
    if name:
        out += f": {name}"
    if arch:
        out += f" ({arch})"
    return out


def run_meta(**extra):
    """What ``write_json`` records about the run: the command line, the device string (and
    the full ``mx.device_info()``), the mlx / mlx-lm / mlx-kvq versions, Python, the
    platform and the date (UTC, ISO 8601). ``extra`` is added (and wins)."""
    import mlx.core as mx

    try:
        info = {k: (v if isinstance(v, (str, int, float)) else str(v)) for k, v in mx.device_info().items()}
    except Exception:
        info = {}
    meta = dict(
        command=shlex.join(getattr(sys, "orig_argv", sys.argv)),
        device=device_string(),
        device_info=info,
        mlx=mx.__version__,
        mlx_lm=_version("mlx-lm"),
        mlx_kvq=_version("mlx-kvq"),
        python=platform.python_version(),
        platform=platform.platform(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    meta.update(extra)
    return meta


def _version(dist):
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def _jsonable(obj):
    """json.dump's fallback: numpy / mlx scalars through ``.item()``, anything else as str."""
    item = getattr(obj, "item", None)
    if callable(item):
        try:
            return item()
        except Exception:
            pass
    return str(obj)


def write_json(rows, path, meta=None):
    """Write ``{"meta": ..., "rows": rows}`` to ``path`` (parent folders created) and return
    the path. ``meta`` (a dict) is laid over ``run_meta()``, so a script passes only what
    that does not know (its parsed arguments, say); keys it gives are kept as given."""
    full = run_meta(**(meta or {}))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": full, "rows": list(rows)}, indent=1, default=_jsonable) + "\n")
    return path


def require_matplotlib():
    """Raise ImportError with an install hint if matplotlib is missing. Scripts call this
    while parsing ``--plot`` so that a long run does not fail only at its end."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError(MATPLOTLIB_MISSING) from e


def _number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def plot(rows, x, ys, path, title, logx=True, *, ylabel=None, logy=False, group=None):
    """Save a PNG of the columns ``ys`` against column ``x`` and return the path.

    One line per y column (per y column and value of column ``group``, if given). Rows
    where a value is missing or not a finite number (failed runs) are left out of that
    line. A numeric ``x`` gives lines, on a log axis with ``logx`` (base 2 when every x
    is a power of two); a non-numeric ``x`` (config names) gives grouped bars, one series
    per line, and ``logx`` does not apply. Uses the Agg backend through
    ``matplotlib.figure.Figure``: no display, and pyplot's global state is not touched.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(MATPLOTLIB_MISSING) from e

    ys = [ys] if isinstance(ys, str) else list(ys)
    rows = list(rows)
    if not ys:
        raise ValueError("plot: no y column given")
    ok = [r for r in rows if "error" not in r]  # when every run failed: an empty plot that says so
    for col in [x, *ys] + ([group] if group else []):
        if ok and not any(col in r for r in ok):
            known = sorted({k for r in ok for k in r})
            raise ValueError(f"plot: no row has column {col!r} (columns: {', '.join(known)})")

    groups = [None]
    if group:
        groups = list(dict.fromkeys(r[group] for r in rows if group in r))
    series = []  # (label, [(x, y), ...])
    for g in groups:
        for y in ys:
            pts = [(r[x], r[y]) for r in rows
                   if x in r and _number(r.get(y)) and (g is None or r.get(group) == g)]
            label = y if g is None else f"{y} ({group}={g})"
            series.append((label, pts))

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs_all = [px for _, pts in series for px, _ in pts]
    if xs_all and all(_number(v) for v in xs_all):
        for label, pts in series:
            if pts:
                pts = sorted(pts)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        xvals = sorted(set(xs_all))
        if logx and all(v > 0 for v in xvals):
            pow2 = all(float(v).is_integer() and int(v) & (int(v) - 1) == 0 for v in xvals)
            ax.set_xscale("log", base=2 if pow2 else 10)
        if len(xvals) <= 12:
            ax.set_xticks(xvals)
            ax.set_xticklabels([f"{v:g}" for v in xvals])
            ax.minorticks_off()
    else:
        cats = list(dict.fromkeys(str(r[x]) for r in rows if x in r))
        width = 0.8 / max(1, len(series))
        for i, (label, pts) in enumerate(series):
            at = {str(px): py for px, py in pts}
            idx = [j for j, c in enumerate(cats) if c in at]
            ax.bar([j - 0.4 + width * (i + 0.5) for j in idx], [at[cats[j]] for j in idx], width, label=label)
        ax.set_xticks(range(len(cats)))
        failed = {str(r[x]) for r in rows if x in r and "error" in r} - {str(px) for _, pts in series for px, _ in pts}
        names = [c + " (failed)" if c in failed else c for c in cats]
        tilt = max(map(len, names), default=0) > 8
        ax.set_xticklabels(names, rotation=20 if tilt else 0, ha="right" if tilt else "center")
    if not xs_all:
        ax.text(0.5, 0.5, "no successful measurement", ha="center", va="center", transform=ax.transAxes)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel or (ys[0] if len(ys) == 1 else "value"))
    ax.set_title(title)
    ax.grid(True, alpha=0.3, which="both")
    if any(pts for _, pts in series):
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
