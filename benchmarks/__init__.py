"""The benchmark scripts of mlx-kvq, installed as ``mlx_kvq.benchmarks``.

Run them with ``python -m mlx_kvq.bench <name> [args]`` (``mlx_kvq.bench --help`` lists them), or
from a source checkout as ``python3 benchmarks/<script>.py [args]``. ``report`` holds the JSON and
plot helpers they share.
"""
