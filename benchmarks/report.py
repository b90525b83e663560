"""Results out: Markdown tables (printed, and summary.md), results.json and PNG plots."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from benchmarks.measure import CPU_WINDOW, GENERATOR_LIMIT

Column = tuple[str, str]  # (header, row key)
Rows = list[dict[str, Any]]

GENERATOR: Column = ("busiest load generator, cores", "generator_core")
CPU_BYTES: list[Column] = [("server CPU-s/GiB", "server_cpu_s_per_gib"),
                           ("client CPU-s/GiB", "client_cpu_s_per_gib"),
                           ("server cores", "server_cores"), ("client cores", "client_cores"),
                           ("target cores", "target_cores"), GENERATOR]
CPU_OPS: list[Column] = [("server CPU µs/op", "server_cpu_us_per_op"),
                         ("client CPU µs/op", "client_cpu_us_per_op"),
                         ("server cores", "server_cores"), ("client cores", "client_cores"),
                         GENERATOR]
LATENCY: list[Column] = [("p50 µs", "p50_us"), ("p99 µs", "p99_us"), ("p99.9 µs", "p999_us")]
TABLES: dict[str, list[Column]] = {
    "throughput": [("direction", "direction"), ("streams", "streams"), ("WS", "websockets"),
                   ("impl", "impl"), ("MiB/s", "mib_per_s"), *CPU_BYTES],
    "echo": [("impl", "impl"), ("streams", "streams"), ("msgs/s", "ops_per_s"), *LATENCY,
             *CPU_OPS],
    "opens": [("impl", "impl"), ("in flight", "depth"), ("opens/s", "ops_per_s"), *CPU_OPS],
    "dns": [("impl", "impl"), ("in flight", "depth"), ("queries/s", "ops_per_s"), *CPU_OPS],
    "idle": [("WebSockets", "connections"), ("gateway processes", "gateway_processes"),
             ("RSS before MiB", "rss_before_mib"), ("RSS after MiB", "rss_after_mib"),
             ("KiB per connection", "rss_per_connection_kib")],
    "peak_rss": [("impl", "impl"), ("streams", "streams"), ("MiB/s", "mib_per_s"),
                 ("RSS before MiB", "rss_base_mib"), ("peak MiB", "rss_peak_mib"),
                 ("growth MiB", "rss_growth_mib"), ("server cores", "server_cores"),
                 ("client cores", "client_cores"), GENERATOR],
    "pkcs11": [("impl", "impl"), ("op", "op"), ("connections", "connections"),
               ("direct ops/s", "direct_ops_per_s"),
               ("gateway ops/s", "gateway_ops_per_s"), ("gateway ÷ direct", "ratio"),
               ("server cores", "gateway_server_cores"),
               ("client cores", "gateway_client_cores")],
    "tls": [("load", "load"), ("via", "via"), ("streams", "streams"), ("MiB/s", "mib_per_s"),
            ("msgs/s", "ops_per_s"), ("p99 µs", "p99_us"), ("server cores", "server_cores"),
            ("client cores", "client_cores"), GENERATOR],
    "workers": [("load", "load"), ("workers", "workers"), ("machine cores", "cores"), ("MiB/s", "mib_per_s"),
                ("msgs/s", "ops_per_s"), ("p99 µs", "p99_us"), ("server cores", "server_cores"),
                ("client cores", "client_cores"), GENERATOR],
}


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 10 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(rows: Rows, columns: list[Column]) -> str:
    """A Markdown table; a failed row shows its error after the identifying columns."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        if "error" in row:
            ident = [_cell(row.get(k)) for _, k in columns if k in row]
            cells = ident + [f"**failed**: {row['error']}"]
            cells += [""] * (len(columns) - len(cells))
        else:
            cells = [_cell(row.get(k)) + (" ⚠" if k == GENERATOR[1] and
                                          row.get("generator_bound") else "")
                     for _, k in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals_table(goals: list[dict[str, Any]]) -> str:
    lines = ["| goal | measured | target | met |", "|---|---|---|---|"]
    for g in goals:
        sign = "≥" if g["higher_is_better"] else "≤"
        met = (f"not judged: {g['why_not_judged']}" if g.get("why_not_judged") else
               {True: "met", False: "**not met**", None: "not measured"}[g["met"]])
        lines.append(f"| {g['name']} | {_cell(g['value'])} | {sign} {g['goal']:g} | {met} |")
    return "\n".join(lines)


QUICK_BANNER = ("**A quick run** (`--quick`: tiny sizes, one run each). It checks that "
                "every scenario works; its figures measure nothing and no goal is judged.")
NOTES = (f"⚠: the busiest load-generator process used more than {GENERATOR_LIMIT:.0%} of a "
         "core, so the row measures the load generator, not the server; no goal is judged "
         f"on it. –: not measured (CPU over less than {CPU_WINDOW:g} s of runs is too coarse "
         "to be a figure).")


def header(doc: dict[str, Any]) -> str:
    """What ran where: the lines every summary starts with."""
    m = doc["machine"]
    lines = [f"Machine: {m['cpu_count']} cores ({m['cpu_model']}), {m['ram_gib']} GiB, "
             f"Python {m['python']}, ksw1fast {m['ksw1fast']}, "
             f"load average {m['load_average_at_start'][0]:.2f} at the start, {m['date']}."]
    if doc.get("quick"):
        lines.insert(0, QUICK_BANNER)
    return "\n\n".join(lines)


def markdown(doc: dict[str, Any]) -> str:
    parts = [header(doc), "## Goals", goals_table(doc["goals"])]
    for name, rows in doc["scenarios"].items():
        parts += [f"## {name}", table(rows, TABLES[name])]
    parts += ["## Ratios (compiled ÷ baseline, same run)",
              table([{"ratio": k, "value": v} for k, v in doc["ratios"].items()],
                    [("ratio", "ratio"), ("value", "value")]), NOTES]
    return "\n\n".join(parts) + "\n"


# -- plots -------------------------------------------------------------------------------

STYLE = {"compiled": "C0", "pure": "C1", "socat": "C2", "websockify": "C3", "direct": "C4"}


def _title(fig: Any, text: str, quick: bool) -> None:
    fig.suptitle(text + ("\nQUICK RUN: tiny sizes, not a measurement" if quick else ""),
                 color="C3" if quick else "k")


def _plot_throughput(plt: Any, rows: Rows, path: Path, quick: bool) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, direction in zip(axes, ("download", "upload")):
        mine = [r for r in rows if r["direction"] == direction and "error" not in r]
        for impl in ("compiled", "pure", "socat"):
            for ws, dash in ((1, "-"), (8, "--")):
                points = sorted((r["streams"], r["mib_per_s"]) for r in mine
                                if r["impl"] == impl and r["websockets"] == ws)
                if points:
                    ax.plot(*zip(*points), dash, marker="o", color=STYLE[impl],
                            label=f"{impl}, {ws} WS" if impl != "socat" else
                            f"socat (TCP), {'1 process' if ws == 1 else '2 processes'}")
        for r in mine:
            if r["impl"] == "websockify":
                ax.plot([1], [r["mib_per_s"]], "s", color=STYLE["websockify"],
                        label="websockify, 1 stream")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 16, 64, 256], ["1", "16", "64", "256"])
        ax.set_title(direction)
        ax.set_xlabel("streams (total)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MiB/s")
    axes[1].legend(fontsize=8)
    _title(fig, "Bulk throughput on loopback (same run)", quick)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_latency(plt: Any, rows: Rows, path: Path, quick: bool) -> None:
    keys = [("p50", "p50_us"), ("p90", "p90_us"), ("p99", "p99_us"), ("p99.9", "p999_us")]
    streams = min((r["streams"] for r in rows), default=0)  # the latency-bound case
    ok = [r for r in rows if "error" not in r and r["streams"] == streams]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(len(ok), 1)
    for i, r in enumerate(ok):
        xs = [j + i * width for j in range(len(keys))]
        ax.bar(xs, [r[k] for _, k in keys], width, color=STYLE.get(r["impl"]),
               label=f"{r['impl']}: {r['ops_per_s']:,} msgs/s")
    ax.set_xticks([j + width * (len(ok) - 1) / 2 for j in range(len(keys))],
                  [name for name, _ in keys])
    ax.set_yscale("log")
    ax.set_ylabel("round trip, µs")
    _title(fig, f"64-byte echo latency percentiles ({streams} streams, 1 in flight each)",
           quick)
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_memory(plt: Any, idle: Rows, peak: Rows, path: Path, quick: bool) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    ok = [r for r in idle if "error" not in r]
    left.bar([f"{r['connections']:,}" for r in ok], [r["rss_per_connection_kib"] for r in ok],
             color=STYLE["compiled"])
    left.axhline(10, color="k", ls=":", label="goal: 10 KiB")
    left.set_xlabel("idle WebSockets, one stream each")
    left.set_ylabel("gateway RSS per connection, KiB")
    left.legend()
    for r in peak:
        if "error" in r or not r["rss_samples_mib"]:
            continue
        t, mib = zip(*r["rss_samples_mib"])
        right.plot(t, [m - r["rss_base_mib"] for m in mib], color=STYLE[r["impl"]],
                   label=f"{r['impl']}: peak +{r['rss_growth_mib']} MiB")
    right.axhline(64, color="k", ls=":", label="goal: +64 MiB")
    right.set_xlabel("seconds into the download")
    right.set_ylabel("gateway RSS growth, MiB")
    bytes_ = next((r["bytes"] for r in peak), 0)
    right.set_title(f"{bytes_ / 2**20:,.0f} MiB downloaded over 64 streams, RSS every 50 ms")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    _title(fig, "Gateway memory", quick)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plots(doc: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    s = doc["scenarios"]
    quick = bool(doc.get("quick"))
    made = []
    for name, needs, draw in (
            ("throughput.png", ("throughput",),
             lambda p: _plot_throughput(plt, s["throughput"], p, quick)),
            ("latency.png", ("echo",), lambda p: _plot_latency(plt, s["echo"], p, quick)),
            ("memory.png", ("idle", "peak_rss"),
             lambda p: _plot_memory(plt, s["idle"], s["peak_rss"], p, quick))):
        if all(n in s for n in needs):  # `--only` may have left a scenario out
            draw(out / name)
            plt.close("all")
            made.append(out / name)
    return made


def write(doc: dict[str, Any], out: Optional[Path]) -> str:
    """Print-ready Markdown; with `out`, also results.json, summary.md and the plots."""
    text = markdown(doc)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
        (out / "summary.md").write_text(text)
        plots(doc, out)
    return text
