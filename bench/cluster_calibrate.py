"""Wall time of calibration + OPTQ in one process and on 1 and 2 Ray workers.

Two models: the shared stories260K (Ray's start-up dominates) and a larger
Llama-shaped model with random weights (hidden 1024, FFN 2816, 8 layers, the
shared tokenizer), where the calibration work dominates.  Every run is the
command a user types (``modulora quantize`` / ``modulora calibrate``) with one
torch thread per process, and the packed weights of every run are checked to
be identical.  Writes ``docs/cluster_calibrate.md``.

    python bench/cluster_calibrate.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import GGUF, REPO, TRAIN_TXT, Cli, table, write_doc

OPTQ = ("--method", "optq", "--bits", "3", "--group-size", "32", "--act-order", "--no-clip-search", "--asym-alpha", "0",
        "--calib", TRAIN_TXT)
LARGE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, max_position_embeddings=512)


def build_large(directory: Path) -> Path:
    """A random-weight Llama of the LARGE shape with the shared model's tokenizer, saved as a float directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.model import load_float_model

    _, tokenizer = load_float_model(GGUF)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **LARGE))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=128, help="Calibration windows of 256 tokens.")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cli = Cli(work, threads=1)
        models = {"stories260K": GGUF, "llama-shaped 1024x8 (random)": build_large(work / "large")}
        for label, source in models.items():
            runs = {}
            for name, command in {
                "one process": ("quantize",),
                "Ray, 1 worker": ("calibrate", "--workers", "1"),
                "Ray, 2 workers": ("calibrate", "--workers", "2"),
            }.items():
                out = work / f"{label[:8]}-{name.replace(' ', '').replace(',', '')}"
                start = time.perf_counter()
                cli.run(*command, source, *OPTQ, "--calib-windows", args.windows, "--out", out)
                runs[name] = (time.perf_counter() - start, out)
            base = runs["one process"]
            for name, (seconds, out) in runs.items():
                rows.append([label, name, f"{seconds:.1f}", f"{base[0] / seconds:.2f}x",
                             "yes" if same_weights(base[1], out) else "NO"])
        body = (f"OPTQ 3-bit g32 act-order, sequential calibration on {args.windows} windows of 256 tokens of "
                "TinyStories train, one torch thread per process, on this 2-core machine. Wall time of the whole "
                "command (loading, Ray start-up, calibration, saving).\n\n"
                + table(["model", "run", "wall s", "speed-up", "identical weights"], rows))
    print(body)
    write_doc("cluster_calibrate", "Calibration on Ray: wall time", "cluster_calibrate.py", body,
              [c.replace(str(REPO) + "/", "") for c in cli.commands])


if __name__ == "__main__":
    main()
