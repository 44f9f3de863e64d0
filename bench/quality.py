"""Quality of every quantizer on the shared model: effective bits per weight, perplexity, time.

Every decoder linear layer of stories260K is quantized (the 172-wide down_proj
included, except where a format cannot hold it: GGUF blocks of 32 keep it in
F16, as llama.cpp does), then evaluated with the perplexity protocol of
``modulora eval`` on the whole of ``tinystories/valid.txt``.  Calibrated
methods draw their windows from ``tinystories/train.txt``.  Writes
``docs/quality.md`` and ``docs/quality.png`` (perplexity against bits).

    python bench/quality.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from engine.data import read_text, token_windows
from engine.eval import perplexity
from engine.model import load_float_model, load_model, model_size, quantize_gguf
from engine.paths import shared_dir
from engine.pipelines import CalibSpec, QuantizeSpec, quantize

DOCS = Path(__file__).resolve().parent.parent / "docs"
OFF = {"act_order": False, "clip_search": False}  # OPTQ as in the reference code, but for act-order
# Every row goes through `modulora quantize`'s use case (engine.pipelines.quantize) with its settings spelled out,
# so no row moves when a default does.  Calibration: sequential, 128 windows of 256 tokens from train.txt (the
# OPTQ paper's protocol); the best settings add a Hessian-weighted clip search and GPTAQ-style asymmetric
# calibration (asym_alpha); "+ distill" rows then tune the continuous parameters towards the float model, an
# opt-in stage (it trains the whole packed model).  The "defaults" rows give only --method and --bits: each must equal
# its method's best rounding row.  (QTIP's "asym 0.5" rows are its defaults spelled out: the runs are too slow here to
# repeat.)
# (label, method, quantizer options, calibration settings or None)
CONFIGS: list[tuple[str, str, dict[str, Any], dict[str, Any] | None]] = [
    *[(f"rtn g{g}", "rtn", {"bits": b, "group_size": g}, None) for b in (4, 3, 2) for g in (32, 64)],
    *[(f"optq g{g} act-order (reference)", "optq", {"bits": b, "group_size": g, **OFF, "act_order": True},
       {"asym_alpha": 0.0}) for b in (4, 3, 2) for g in (32, 64)],
    *[(f"optq g{g} act-order clip-search asym 0.5", "optq",
       {"bits": b, "group_size": g, "act_order": True, "clip_search": True}, {"asym_alpha": 0.5})
      for b in (4, 3, 2) for g in (32, 64)],
    *[("quip#", "quip", {"bits": b}, {"asym_alpha": 0.0}) for b in (4, 3, 2)],
    *[("quip# asym 0.5", "quip", {"bits": b}, {"asym_alpha": 0.5}) for b in (4, 3, 2)],
    ("quip# incoherence both (reference)", "quip", {"bits": 2, "incoherence": "both"}, {"asym_alpha": 0.0}),
    # QuIP#'s fine-tuning: the rounded model's continuous parameters distilled towards the float one (--distill-steps)
    *[("quip# asym 0.5 + distill 300", "quip", {"bits": b}, {"asym_alpha": 0.5, "distill_steps": 300})
      for b in (3, 2)],
    *[("quip# asym 0.5 + distill 300 on 512 windows", "quip", {"bits": b},
       {"asym_alpha": 0.5, "distill_steps": 300, "distill_windows": 512}) for b in (3, 2)],
    *[("optq g32 act-order clip-search asym 0.5 + distill 300", "optq",
       {"bits": b, "group_size": 32, "act_order": True, "clip_search": True}, {"asym_alpha": 0.5, "distill_steps": 300})
      for b in (3, 2)],
    # QTIP: QuIP#'s incoherence and LDLQ with bitshift trellis codes (engine.quant.qtip), and its RMS target
    *[("qtip asym 0.5 + distill 300 on 512 windows", "qtip", {"bits": b},
       {"asym_alpha": 0.5, "distill_steps": 300, "distill_windows": 512}) for b in (3, 2)],
    *[("qtip asym 0.5", "qtip", {"bits": b}, {"asym_alpha": 0.5}) for b in (3, 2, 4)],
    *[(f"hqq g{g}", "hqq", {"bits": b, "group_size": g}, None) for b in (4, 3, 2) for g in (32, 64)],
    *[(f"{m} block {g}", m, {"bits": 4, "group_size": g}, None) for m in ("nf4", "fp4") for g in (32, 64)],
    *[(f"defaults: --method {m} --bits {b}", m, {"bits": b}, {} if m in ("optq", "quip") else None)
      for m, widths in (("rtn", (4, 3, 2)), ("optq", (4, 3, 2)), ("quip", (4, 3, 2)), ("hqq", (4, 3, 2)),
                        ("nf4", (4,)), ("fp4", (4,))) for b in widths],
]
GGUF_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


def evaluate(model: torch.nn.Module, windows: torch.Tensor) -> float:
    return perplexity(model, windows, progress=False).ppl


def run_config(model_path: Path, method: str, options: dict[str, Any], calib: dict[str, Any] | None,
               calib_text: Path, out: Path) -> tuple[torch.nn.Module, float]:
    spec = QuantizeSpec(model=str(model_path), out=str(out), method=method, options=options,
                        calib=None if calib is None else CalibSpec(file=str(calib_text), **calib))
    seconds = quantize(spec)["quantize_seconds"]
    return load_model(out)[0], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="First 64 validation windows only (a smoke run).")
    parser.add_argument("--keep-measured", action="store_true",
                        help="Run only the rows docs/quality.md lacks; keep its other rows as they were measured.")
    args = parser.parse_args()
    torch.manual_seed(0)
    shared = shared_dir()
    gguf_path = shared / "models" / "stories260K.gguf"
    calib_text = shared / "data" / "tinystories" / "train.txt"
    float_model, tokenizer = load_float_model(gguf_path)
    windows = token_windows(tokenizer, read_text(shared / "data" / "tinystories" / "valid.txt"), 256)
    if args.quick:
        windows = windows[:64]
    float_ppl = evaluate(float_model, windows)
    rows: list[dict[str, Any]] = [{"label": "float32", "method": "float", "bits": 32, "bpw": 32.0, "ppl": float_ppl, "seconds": 0.0}]
    kept = measured_rows() if args.keep_measured else []
    rows += kept
    done = {(r["bits"], r["label"]) for r in kept}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, method, options, calib) in enumerate(CONFIGS):
            if (options["bits"], label) in done:
                continue
            model, seconds = run_config(gguf_path, method, options, calib, calib_text, Path(tmp) / f"q{i}")
            bits = options["bits"]
            rows.append({"label": label, "method": method, "bits": bits, "bpw": model_size(model)["bits_per_weight"],
                         "ppl": evaluate(model, windows), "seconds": seconds})
            print(f"{method:5s} {bits} {label:40s} bpw {rows[-1]['bpw']:.3f} ppl {rows[-1]['ppl']:.3f} {seconds:.1f}s",
                  flush=True)
        for qtype in GGUF_TYPES:
            if (int(qtype[1]), f"gguf {qtype} (down_proj F16)") in done:
                continue
            start = time.perf_counter()
            quantize_gguf(gguf_path, Path(tmp) / f"{qtype}.gguf", qtype)
            seconds = time.perf_counter() - start
            model, _, _ = load_model(Path(tmp) / f"{qtype}.gguf")
            rows.append({"label": f"gguf {qtype} (down_proj F16)", "method": "gguf", "bits": int(qtype[1]),
                         "bpw": model_size(model)["bits_per_weight"], "ppl": evaluate(model, windows), "seconds": seconds})
    write_report(rows, float_ppl, windows, args.quick, bool(kept))


def measured_rows() -> list[dict[str, Any]]:
    """The rows of the current ``docs/quality.md`` (for ``--keep-measured``: quantizers are deterministic, so a row
    already measured by this script is what running it again gives, up to its time)."""
    methods = {label: method for label, method, _, _ in CONFIGS}
    rows = []
    for line in (DOCS / "quality.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 6 or not cells[0].isdigit():
            continue
        bits, label, bpw, ppl, _, seconds = cells
        rows.append({"label": label, "method": methods.get(label, label.split()[0]), "bits": int(bits),
                     "bpw": float(bpw), "ppl": float(ppl), "seconds": float(seconds)})
    return rows


def gap_closed(ppl: float, baseline: float, float_ppl: float) -> float:
    """Share of ``baseline``'s log-perplexity gap to float that ``ppl`` closes."""
    return (math.log(baseline) - math.log(ppl)) / (math.log(baseline) - math.log(float_ppl))


def write_report(rows: list[dict[str, Any]], float_ppl: float, windows: torch.Tensor, quick: bool, kept: bool) -> None:
    rtn32 = {r["bits"]: r["ppl"] for r in rows if r["label"] == "rtn g32"}
    lines = [
        f"Perplexity of stories260K on tinystories/valid.txt ({windows.shape[0]} windows of {windows.shape[1]} tokens"
        f"{', quick subset' if quick else ''}); float32 {float_ppl:.4f}. "
        "`gap closed` is the share of RTN g32's log-perplexity gap to float that a method closes at the same bits.",
        "",
        "| bits | method | bits/weight | ppl | gap closed vs RTN g32 | quantize s |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in sorted(rows[1:], key=lambda r: (-r["bits"], r["ppl"])):
        closed = f"{gap_closed(r['ppl'], rtn32[r['bits']], float_ppl):.0%}" if r["bits"] in rtn32 else "-"
        lines.append(f"| {r['bits']} | {r['label']} | {r['bpw']:.3f} | {r['ppl']:.3f} | {closed} | {r['seconds']:.1f} |")
    lines += ["", "`+ distill 300`: `--distill-steps 300` after rounding (QuIP#'s end-to-end fine-tuning): 300 Adam "
              "steps of 16 calibration windows tune the embeddings, norms, output head and one gain per output row "
              "(folded into the stored scales, no bit added) towards the float model's next-token distribution "
              "(KL only, no cross-entropy, so the target is the float model, not the text). The codes are the "
              "rounded row's. It is opt-in: the teacher runs once over the windows, but the steps train the whole "
              "resident packed model (minutes here, hours for a 7B model on a CPU; its memory: `modulora plan --stage "
              "quantize --distill-steps 300`). Its time is included in `quantize s`. `on 512 windows`: "
              "`--distill-windows 512`, the distillation's own draw of 512 windows from train.txt instead of the "
              "128 calibration windows.",
              "", "`qtip`: QuIP#'s input incoherence, row scales and block LDLQ with bitshift trellis codes in place of "
              "E8P lattice codes (`engine/quant/qtip.py`, `engine/quant/trellis.py`): 12 state bits, exactly `bits` "
              "stored bits per weight, each 32-row x 8-column tile encoded by an exact Viterbi pass, 2 refining "
              "passes. Its bits/weight count the same row scales and sign vectors as QuIP#'s. The Viterbi passes make "
              "it far slower to quantize than QuIP# on this CPU (`quantize s`)."]
    if kept:
        lines += ["", "Written with `--keep-measured`: the rows of the previous table were kept as measured then (the "
                  "quantizers are deterministic; their `quantize s` is that run's), the new rows measured now."]
    table = "\n".join(lines)
    print(table)
    DOCS.mkdir(exist_ok=True)
    (DOCS / "quality.md").write_text(f"# Quantizer quality\n\n`python bench/quality.py{' --keep-measured' if kept else ''}`\n\n{table}\n\n![ppl vs bits](quality.png)\n")
    plot(rows, float_ppl, DOCS / "quality.png")


def plot(rows: list[dict[str, Any]], float_ppl: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for method in dict.fromkeys(r["method"] for r in rows[1:]):
        points = sorted((r["bpw"], r["ppl"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*points), marker="o", linestyle="", label=method)
    ax.axhline(float_ppl, color="black", linestyle="--", linewidth=1, label=f"float32 ({float_ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per weight (scales, zeros, signs included)")
    ax.set_ylabel("perplexity (tinystories valid)")
    ax.set_title("stories260K: perplexity against storage")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
