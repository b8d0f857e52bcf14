"""The table ``mlx_kvq.eval`` prints."""




def format_table(rows, needle_rows=None):
    """A plain-text table of :func:`evaluate` rows (and needle recall, if given)."""
    recall = {r["config"]: r["recall"] for r in needle_rows or []}
    head = f"{'config':<18} {'ppl':>9} {'Δppl':>8} {'KL':>8} {'top-1':>7} {'bytes/tok':>10}"
    if needle_rows:
        head += f" {'needle':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (
            f"{r['config']:<18} {r['ppl']:>9.3f} {r['dppl_pct']:>+7.2f}% {r['kl']:>8.4f} "
            f"{100 * r['top1']:>6.1f}% {r['kv_bytes_per_token']:>10.0f}"
        )
        if needle_rows:
            line += f" {recall[r['config']]:>7.0%}" if r["config"] in recall else f" {'-':>7}"
        lines.append(line)
    legend = _legend(rows)
    if legend:
        lines += ["configs as built:"] + legend
    return "\n".join(lines)


def _legend(rows):
    out = []
    for r in rows:
        cfg = r.get("cache") or {}
        if "k_bits" in cfg:
            bits = cfg["k_bits"] if cfg["k_bits"] == cfg["v_bits"] else f"{cfg['k_bits']}/{cfg['v_bits']}"
            out.append(
                f"  {r['config']:<16} = {bits} bits, {cfg.get('mode', 'affine')}, group {cfg.get('group_size')}, "
                f"rotate {cfg.get('rotate') or 'none'}, sinks {cfg.get('sinks')}, window {cfg.get('window')}"
            )
    return out
