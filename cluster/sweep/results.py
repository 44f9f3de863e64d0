"""A sweep's results: ``results.parquet`` (one row per trial), ``pareto.png`` and the printed table."""

from __future__ import annotations

import io
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine.storage import atomic_write_bytes

from cluster.sweep.spec import Point

RESULT_COLUMNS = {  # of results.parquet; "metric" is the sweep's metric, named in the file's metadata
    "method": "string", "bits": "int64", "group_size": "int64", "rank": "int64", "lr": "float64",
    "metric": "float64", "bits_per_weight": "float64", "bits_per_weight_with_adapter": "float64",
    "peak_rss_mib": "float64", "peak_gpu_mib": "float64", "wall_s": "float64", "attempt": "int64", "status": "string",
}  # peak_gpu_mib: torch.cuda.max_memory_allocated of a trial Ray gave a GPU (NaN on CPU trials)


def result_rows(points: list[Point], finished: dict[Point, dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One row per point, in grid order (method, bits, group size, rank, lr); points without a finished trial
    get NaNs and status ``error``."""
    rows = []
    for point in points:
        reported = finished.get(point, {})
        rows.append({
            **asdict(point),
            "metric": float(reported.get(metric, math.nan)),
            "bits_per_weight": float(reported.get("bits_per_weight", math.nan)),
            "bits_per_weight_with_adapter": float(reported.get("bits_per_weight_with_adapter", math.nan)),
            "peak_rss_mib": float(reported.get("peak_rss_mib", math.nan)),
            "peak_gpu_mib": float(reported.get("peak_gpu_mib", math.nan)),
            "wall_s": float(reported.get("wall_s", math.nan)),
            "attempt": int(reported.get("attempt", 0)),
            "status": "ok" if point in finished else "error",
        })
    return sorted(rows, key=lambda r: (r["method"], r["bits"], r["group_size"] or 0, r["rank"], r["lr"]))


def pareto_front(costs: list[tuple[float, ...]]) -> list[bool]:
    """For each point (all coordinates minimised): is it on the front, i.e. does no other point cost at
    most as much in every coordinate and less in one?"""
    return [
        not any(other != mine and all(o <= m for o, m in zip(other, mine)) for other in costs) for mine in costs
    ]


def _finished(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "ok" and math.isfinite(r["metric"])]


def write_results(rows: list[dict[str, Any]], metric: str, out_dir: Path) -> None:
    """``results.parquet`` (the metric's name in the schema metadata) and ``pareto.png``, each written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.type_for_alias(kind)) for name, kind in RESULT_COLUMNS.items()],
                       metadata={"metric": metric})
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    atomic_write_bytes(out_dir / "results.parquet", sink.getvalue().to_pybytes())
    atomic_write_bytes(out_dir / "pareto.png", pareto_png(_finished(rows), metric))


def pareto_png(rows: list[dict[str, Any]], metric: str) -> bytes:
    """Two panels, the metric against bits per weight and against peak memory, each with its Pareto front."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    panels = (("bits_per_weight", "bits per weight"), ("peak_rss_mib", "peak RSS of the trial (MiB)"))
    for ax, (x_key, label) in zip(axes, panels):
        for method in sorted({r["method"] for r in rows}):
            mine = [r for r in rows if r["method"] == method]
            ax.scatter([r[x_key] for r in mine], [r["metric"] for r in mine], label=method, alpha=0.7)
        front = [r for r, on in zip(rows, pareto_front([(r[x_key], r["metric"]) for r in rows])) if on]
        front.sort(key=lambda r: r[x_key])
        ax.step([r[x_key] for r in front], [r["metric"] for r in front], where="post", color="black", lw=1,
                label="Pareto front")
        ax.scatter([r[x_key] for r in front], [r["metric"] for r in front], s=120, facecolors="none",
                   edgecolors="black")
        for r in front:
            ax.annotate(f"{r['method']} {r['bits']}b r{r['rank']}", (r[x_key], r["metric"]), xytext=(4, 4),
                        textcoords="offset points", fontsize=8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{metric} (lower is better)")
    axes[0].legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    """The results as a text table; ``*`` marks the Pareto front of the metric against bits per weight."""
    finished = _finished(rows)
    on_front = pareto_front([(r["bits_per_weight"], r["metric"]) for r in finished])
    front = {id(r) for r, on in zip(finished, on_front) if on}
    lines = [f"{'method':<8} {'bits':>4} {'group':>5} {'rank':>4} {'lr':>8} {metric:>10} {'bits/w':>7} "
             f"{'+adapter':>8} {'peak MiB':>8} {'wall s':>7} {'try':>3}  status"]
    for r in rows:
        group = "-" if r["group_size"] is None else str(r["group_size"])
        mark = " *" if id(r) in front else ""
        lines.append(
            f"{r['method']:<8} {r['bits']:>4} {group:>5} {r['rank']:>4} {r['lr']:>8.2g} {r['metric']:>10.4f} "
            f"{r['bits_per_weight']:>7.3f} {r['bits_per_weight_with_adapter']:>8.3f} {r['peak_rss_mib']:>8.1f} "
            f"{r['wall_s']:>7.1f} {r['attempt']:>3}  {r['status']}{mark}"
        )
    return "\n".join(lines)
