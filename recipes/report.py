"""``report.md``: a recipe run's report (``report.json``) as tables a person reads."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _headline(stage: str, metrics: dict[str, Any]) -> str:
    """The few numbers that say how a stage went."""
    if stage == "quantize":
        q = metrics.get("quantizer", {})
        return f"{q.get('method')} {q.get('bits', '')}-bit, {metrics['bits_per_weight']:.3f} bits/weight"
    if stage in ("correct", "finetune"):
        final = metrics.get("final", {})
        loss = f"final loss {final['loss']:.4f}, " if "loss" in final else ""
        return f"{loss}{metrics.get('bits_per_weight_with_adapter', float('nan')):.3f} bits/weight with adapter"
    if stage == "sweep":
        best = metrics["best"]
        return (f"{metrics['trials']} trials; best {metrics['metric']} {best['metric']:.4f} "
                f"({best['method']} {best['bits']}-bit r{best['rank']})")
    if stage == "export":
        return f"PEFT adapter rank {metrics['rank']}" + (", merged float model" if metrics.get("merged") else "")
    return ""


def _evaluation_rows(results: dict[str, Any]) -> list[str]:
    rows = []
    for model, entry in results.items():
        for task, values in entry.items():
            if not isinstance(values, dict):
                continue
            per_rank = values.get("ranks", {"": values})
            for rank, metrics in per_rank.items():
                shown = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if k in ("ppl", "accuracy", "rouge1",
                                                                                         "rouge2", "rougeL", "tokens"))
                rows.append(f"| {model} | {task} | {rank or '-'} | {entry['bits_per_weight_with_adapter']:.3f} | "
                            f"{shown} |")
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    status = "finished" if report["finished"] else "not finished"
    lines = [f"# Recipe {report['name']} ({status})", "", f"Recipe: `{report['recipe']}`  ",
             f"Output: `{report['output']}`", "",
             "| stage | this run | seconds | peak RSS (MiB) | output (MB) | result |",
             "|---|---|---:|---:|---:|---|"]
    for stage, record in report["stages"].items():
        how = "skipped (done)" if record["skipped"] else ("resumed" if record["resumed"] else "ran")
        lines.append(f"| {stage} | {how} | {record['seconds']:.1f} | {record['peak_rss_bytes'] / 2**20:.0f} | "
                     f"{record['output_bytes'] / 1e6:.2f} | {_headline(stage, record['metrics'])} |")
    lines += ["", f"Stage time in total: {report['seconds_all_stages']:.1f} s "
              f"(this invocation: {report['seconds_this_run']:.1f} s)."]
    evaluation = report["stages"].get("evaluate")
    if evaluation:
        lines += ["", "## Evaluation", "", "| model | task | rank | bits/weight (with adapter) | metrics |",
                  "|---|---|---|---:|---|", *_evaluation_rows(evaluation["metrics"])]
    return "\n".join(lines) + "\n"
