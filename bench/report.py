"""Results: the side-by-side table, the targets with PASS/FAIL, the JSON file and the chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson


def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "—" if v is None else fmt.format(v)


def _get(results: dict[str, Any], run: str, key: str) -> float | None:
    r = results.get("runs", {}).get(run)
    return None if not r else r.get(key)


def added(results: dict[str, Any], run: str, base: str, key: str = "ttft_p50_ms") -> float | None:
    a, b = _get(results, run, key), _get(results, base, key)
    return None if a is None or b is None else a - b


def table(results: dict[str, Any]) -> str:
    """The side-by-side table (markdown, readable in a terminal too)."""
    n = results["config"]["sessions"]
    rss = (results.get("idle") or {}).get("rss_per_conn_kb")
    rss_sse = (results.get("idle_sse") or {}).get("rss_per_conn_kb")
    cols = ("baseline", "ws", "sse")
    rows: list[tuple[str, list[str]]] = [
        (f"msgs/s @{n} sessions", [_f(_get(results, c, "msgs_per_s")) for c in cols]),
        (f"TTFT p50 ms @{n}", [_f(_get(results, c, "ttft_p50_ms"), "{:.2f}") for c in cols]),
        (f"TTFT p99 ms @{n}", [_f(_get(results, c, "ttft_p99_ms"), "{:.2f}") for c in cols]),
        (f"added TTFT p50 ms @{n}",
         ["—", *(_f(added(results, c, "baseline"), "{:+.2f}") for c in cols[1:])]),
        ("TTFT p50 ms @1", [_f(_get(results, c + "_1", "ttft_p50_ms"), "{:.2f}") for c in cols]),
        ("TTFT p99 ms @1", [_f(_get(results, c + "_1", "ttft_p99_ms"), "{:.2f}") for c in cols]),
        ("added TTFT p50 ms @1",
         ["—", *(_f(added(results, c + "_1", "baseline_1"), "{:+.2f}") for c in cols[1:])]),
        (f"gateway CPU ms/msg @{n}",
         ["—", *(_f(_get(results, c, "gateway_cpu_ms_per_msg"), "{:.2f}") for c in cols[1:])]),
        (f"upstream CPU ms/msg @{n}",
         [_f(_get(results, c, "fake_cpu_ms_per_msg"), "{:.2f}") for c in cols]),
        (f"PostgreSQL CPU ms/msg @{n}",
         [_f(_get(results, c, "postgres_cpu_ms_per_msg"), "{:.2f}") for c in cols]),
        (f"client CPU ms/msg @{n}",
         [_f(_get(results, c, "client_cpu_ms_per_msg"), "{:.2f}") for c in cols]),
        (f"machine CPU busy % @{n}", [_f(_get(results, c, "machine_busy_pct")) for c in cols]),
        (f"frames or events per reply @{n}",
         [_f(_get(results, c, "frames_per_msg"), "{:.1f}") for c in cols]),
        ("RSS per idle conn KB", ["—", _f(rss), _f(rss_sse)]),
        ("errors", [str(_get(results, c, "errors") or 0) if c in results.get("runs", {}) else "—"
                    for c in cols]),
    ]  # fmt: skip
    w0 = max(len(r[0]) for r in rows)
    lines = [f"| {'':<{w0}} | {'baseline':>10} | {'ws':>10} | {'sse':>10} |",
             f"|{'-' * (w0 + 2)}|{'-' * 12}|{'-' * 12}|{'-' * 12}|"]  # fmt: skip
    for name, vals in rows:
        lines.append(f"| {name:<{w0}} | " + " | ".join(f"{v:>10}" for v in vals) + " |")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with the measured value and PASS / FAIL / not run."""
    out: list[dict[str, Any]] = []
    n = results["config"]["sessions"]

    def add(name: str, measured: str, ok: bool | None, note: str = "") -> None:
        verdict = "not run" if ok is None else "PASS" if ok else "FAIL"
        out.append({"target": name, "measured": measured, "result": verdict, "note": note})

    base = _get(results, "baseline", "msgs_per_s")
    for t in ("ws", "sse"):
        rate = _get(results, t, "msgs_per_s")
        if base and rate is not None:
            share = rate / base
            add(
                f"{t}: ≥50% of baseline msgs/s @50 sessions",
                f"{share:.0%} ({rate:.0f}/{base:.0f})",
                share >= 0.5,
                "" if n == 50 else f"measured at {n} sessions",
            )
        else:
            add(f"{t}: ≥50% of baseline msgs/s @50 sessions", "—", None)
    for t in ("ws", "sse"):
        a = added(results, t + "_1", "baseline_1")
        add(
            f"{t}: added TTFT p50 ≤ 1 ms @1 session",
            _f(a, "{:+.2f} ms"),
            None if a is None else a <= 1.0,
        )
    for key, target, unit in (
        ("idle", "idle session ≤ 25 KB RSS", "sockets"),
        ("idle_sse", "sse: idle keep-alive connection ≤ 25 KB RSS", "connections"),
    ):
        kind = results.get(key) or {}
        rss = kind.get("rss_per_conn_kb")
        add(
            target,
            _f(rss, "{:.1f} KB"),
            None if rss is None else rss <= 25,
            f"{kind.get('held')} {unit}" if kind else "",
        )
    idle = results.get("idle") or {}
    if idle and idle.get("requested", 0) >= 10_000 and results["config"]["workers"] == 1:
        add(
            "one process holds 10,000 idle sockets",
            f"{idle['held']} held, {idle['failed']} failed",
            idle["held"] >= 10_000,
        )
    else:
        add("one process holds 10,000 idle sockets", "—", None, "run with --idle 10000")
    sc = results.get("scale") or {}
    if sc.get("ratio") is not None:
        add(
            "--workers 2 scales (≥1.5x ws msgs/s of 1 worker)",
            f"{sc['ratio']:.2f}x ({sc['w2']:.0f} vs {sc['w1']:.0f} msgs/s)",
            sc["ratio"] >= 1.5,
            "2 cores shared with the client, fake upstream and PostgreSQL",
        )
    else:
        add("--workers 2 scales", "—", None)
    return out


def heavy_table(results: dict[str, Any]) -> str:
    """ws at N sessions beside one visitor sending order lists back to back."""
    n = results["config"]["sessions"]
    cols = ("ws", "ws_beside_inline", "ws_beside_helper")
    rows: list[tuple[str, list[str]]] = [
        (f"msgs/s @{n} sessions", [_f(_get(results, c, "msgs_per_s")) for c in cols]),
        (f"TTFT p50 ms @{n}", [_f(_get(results, c, "ttft_p50_ms"), "{:.2f}") for c in cols]),
        (f"TTFT p99 ms @{n}", [_f(_get(results, c, "ttft_p99_ms"), "{:.2f}") for c in cols]),
        ("gateway CPU ms/msg", [_f(_get(results, c, "gateway_cpu_ms_per_msg"), "{:.2f}")
                                for c in cols]),
        ("neighbour's messages answered", [_f(_get(results, c, "neighbour_answered"), "{:.0f}")
                                           for c in cols]),
    ]  # fmt: skip
    w0 = max(len(r[0]) for r in rows)
    heads = ("no neighbour", "inline", "helper")
    lines = [f"| {'beside a heavy neighbour':<{w0}} | " + " | ".join(f"{h:>12}" for h in heads)
             + " |", f"|{'-' * (w0 + 2)}|" + "|".join("-" * 14 for _ in heads) + "|"]  # fmt: skip
    for name, vals in rows:
        lines.append(f"| {name:<{w0}} | " + " | ".join(f"{v:>12}" for v in vals) + " |")
    return "\n".join(lines)


def stages_table(results: dict[str, Any]) -> str:
    """Where one session's time to first delta went (means, from the gateway's histograms).

    Each stage is the mean of one observation; `crypto` and `database` are observed
    twice per message (the visitor's message and the reply: one of each comes before
    the first delta). The rest is the client's mean TTFT less the baseline's and less
    the stages before the first delta.
    """
    cols = [c for c in ("ws_1", "sse_1") if _get(results, c, "stages")]
    base = _get(results, "baseline_1", "ttft_mean_ms")
    names = {
        "policy": "policy checks",
        "redaction": "redaction",
        "crypto": "sealing (AES-GCM)",
        "database": "durable insert (commit)",
        "upstream_first_chunk": "upstream's first chunk",
    }
    rows: list[tuple[str, list[str]]] = [
        ("client TTFT mean", [_f(_get(results, c, "ttft_mean_ms"), "{:.2f}") for c in cols]),
        ("baseline TTFT mean", [_f(base, "{:.2f}") for _ in cols]),
    ]
    rest: list[float | None] = []
    for c in cols:
        st = results["runs"][c]["stages"]
        mean = _get(results, c, "ttft_mean_ms")
        parts = [st[k]["mean_ms"] for k in names if st[k]["mean_ms"] is not None]
        if mean is None or base is None or len(parts) < len(names):
            rest.append(None)
        else:
            rest.append(mean - base - sum(parts))
    for key, label in names.items():
        rows.append((label, [_f(results["runs"][c]["stages"][key]["mean_ms"], "{:.3f}")
                             for c in cols]))  # fmt: skip
    rows.append(("rest (socket, framing, resume, loop, client)", [_f(r, "{:.2f}") for r in rest]))
    w0 = max(len(r[0]) for r in rows)
    heads = [c.removesuffix("_1") for c in cols]
    lines = [f"| {'where TTFT @1 goes, mean ms':<{w0}} | " + " | ".join(f"{h:>8}" for h in heads)
             + " |", f"|{'-' * (w0 + 2)}|" + "|".join("-" * 10 for _ in heads) + "|"]  # fmt: skip
    for name, vals in rows:
        lines.append(f"| {name:<{w0}} | " + " | ".join(f"{v:>8}" for v in vals) + " |")
    return "\n".join(lines)


def targets_table(rows: list[dict[str, Any]]) -> str:
    w = max(len(r["target"]) for r in rows)
    wm = max(len(r["measured"]) for r in rows)
    lines = [f"| {'target':<{w}} | {'measured':<{wm}} | result  |",
             f"|{'-' * (w + 2)}|{'-' * (wm + 2)}|---------|"]  # fmt: skip
    for r in rows:
        note = f" {r['note']}" if r["note"] else ""
        lines.append(f"| {r['target']:<{w}} | {r['measured']:<{wm}} | {r['result']:<7} |{note}")
    return "\n".join(lines)


def write(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2, default=str))


def chart(results: dict[str, Any], path: Path) -> None:
    """Four panels: throughput, TTFT at N, TTFT at 1, gateway CPU per message."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["baseline", "ws", "sse"]
    colors = ["#888888", "#1f77b4", "#ff7f0e"]
    n = results["config"]["sessions"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))

    def bars(ax: Any, keys: list[str], metric: str, title: str, unit: str) -> None:
        vals = [_get(results, k, metric) or 0.0 for k in keys]
        ax.bar(cols, vals, color=colors)
        ax.set_title(title)
        ax.set_ylabel(unit)
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.1f}", (i, v), ha="center", va="bottom", fontsize=8)

    bars(axes[0][0], cols, "msgs_per_s", f"throughput @{n} sessions", "messages/s")
    ax = axes[0][1]
    x = range(len(cols))
    p50 = [_get(results, c, "ttft_p50_ms") or 0.0 for c in cols]
    p99 = [_get(results, c, "ttft_p99_ms") or 0.0 for c in cols]
    ax.bar([i - 0.2 for i in x], p50, 0.4, label="p50", color="#4c72b0")
    ax.bar([i + 0.2 for i in x], p99, 0.4, label="p99", color="#dd8452")
    ax.set_xticks(list(x), cols)
    ax.set_title(f"time to first delta @{n} sessions")
    ax.set_ylabel("ms")
    ax.legend()
    bars(axes[1][0], [c + "_1" for c in cols], "ttft_p50_ms", "TTFT p50 @1 session", "ms")
    bars(axes[1][1], cols, "gateway_cpu_ms_per_msg", f"gateway CPU per message @{n}", "ms CPU")
    idle = results.get("idle") or {}
    fig.suptitle(
        f"omnigate bench {results['timestamp']} — chunks={results['config']['chunks']} "
        f"delay={results['config']['delay_ms']}ms workers={results['config']['workers']}"
        + (f" — idle {idle.get('rss_per_conn_kb', 0):.1f} KB/conn" if idle else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
