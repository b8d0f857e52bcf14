"""Stall reasons and instruction mix of one kernel from Nsight Compute's source page.

    ncu --clock-control none --set full -k regex:sdpa_decode --launch-skip 2 --launch-count 1 \\
        -o rep python3 benchmarks/bench_attention.py --ncu-decode 4      # MLX_KVQ_DECODE_BODY=simd|mma
    ncu --import rep.ncu-rep --page source --csv --print-source sass > src.csv
    python3 benchmarks/lab/ncu_stalls.py src.csv
"""

import collections
import csv
import sys


def main(path):
    rows = list(csv.reader(open(path)))
    hdr = next(r for r in rows if "Source" in r)
    data = rows[rows.index(hdr) + 1:]
    ix = {h: i for i, h in enumerate(hdr)}
    stalls = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    total, ops = collections.Counter(), collections.Counter()
    for r in data:
        for c in stalls:
            total[c] += int(r[ix[c]] or 0)
        words = r[ix["Source"]].split()
        op = next((w for w in words if not w.startswith("@")), "?").split(".")[0]
        ops[op] += int(r[ix["Instructions Executed"]] or 0)
    n = sum(total.values())
    print("stall samples:", ", ".join(f"{c[6:]} {100 * v / n:.1f}%" for c, v in total.most_common(8)))
    e = sum(ops.values())
    print(f"warp instructions executed {e:,}:", ", ".join(f"{o} {100 * v / e:.1f}%" for o, v in ops.most_common(10)))


if __name__ == "__main__":
    main(sys.argv[1])
