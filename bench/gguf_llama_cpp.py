"""GGUF against llama.cpp itself (llama-cpp-python): the engine's perplexity of each quantized GGUF type equals
llama.cpp's on the same tokens, and ``modulora export --gguf`` output runs in llama.cpp with the engine's logits.

Quantized files: the legacy types written by gguf-py (``quantize_gguf``, as the engine's tests make them) and the
K- and i-quants written by llama.cpp's own quantizer (``llama_model_quantize``).  The engine's perplexity is
``modulora eval FILE --seq-len 256 --json`` on the whole ``tinystories/valid.txt`` (the README's protocol);
llama.cpp's is computed here over the same token windows from its logits, log-softmax in float64.

    python bench/gguf_llama_cpp.py [--work DIR]

Writes ``docs/gguf_llama_cpp.md``.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from _common import GGUF, TRAIN_TXT, VALID_TXT, Cli, add_run_options, table, work_dir, write_doc

GGUF_PY_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
LLAMA_CPP_TYPES = ("Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_NL", "IQ4_XS")
SEQ_LEN = 256
FINETUNE = ("--data", TRAIN_TXT, "--limit", 16, "--seq-len", 64, "--steps", 4, "--batch-size", 4, "--rank", 4,
            "--lr", 0.01, "--save-every", 0)


class LlamaCpp:
    """One GGUF file (and optionally a LoRA) in llama.cpp; logits of token sequences, each from an empty cache."""

    def __init__(self, model_path: Path, n_ctx: int, lora_path: Path | None = None) -> None:
        import llama_cpp
        import llama_cpp.llama_cpp as api

        # llama.cpp's CPU weight repacking (its "extra buffer types") segfaults in decode on this model's quantized
        # 64-wide matrices for batches of more than one token on this machine's CPU (llama.cpp's own Q8_0 file
        # too): load with the plain layouts (use_extra_bufts off), which llama-cpp-python does not expose.
        defaults = api.llama_model_default_params

        def plain_layouts() -> Any:
            params = defaults()
            params.use_extra_bufts = False
            return params

        api.llama_model_default_params = plain_layouts
        try:
            self.llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                                       lora_path=None if lora_path is None else str(lora_path), n_threads=2, seed=0,
                                       type_k=api.GGML_TYPE_F32, type_v=api.GGML_TYPE_F32,  # not its F16 cache
                                       verbose=False)
        finally:
            api.llama_model_default_params = defaults

    def logits(self, tokens: list[int]) -> np.ndarray:
        """``[len(tokens), vocab]`` float64."""
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float64)

    def perplexity(self, windows: list[list[int]]) -> float:
        """``exp(mean NLL)`` of each window's next tokens, log-softmax in float64 (the README's protocol)."""
        total, count = 0.0, 0
        for window in windows:
            logits = self.logits(window)[:-1]
            logits -= logits.max(axis=1, keepdims=True)
            log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            total -= log_probs[np.arange(len(window) - 1), window[1:]].sum()
            count += len(window) - 1
        return math.exp(total / count)

    def close(self) -> None:
        self.llm.close()


def quantize_with_llama_cpp(src: Path, dst: Path, ftype: str) -> None:
    """llama.cpp's own quantizer, for the types gguf-py cannot write (K- and i-quants)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {ftype}")


def block_types(path: Path) -> str:
    """The GGML types of a file's decoder block matrices, with counts."""
    from gguf import GGUFReader

    counts = Counter(t.tensor_type.name for t in GGUFReader(path).tensors if t.name.startswith("blk.")
                     and len(t.shape) == 2)
    return ", ".join(f"{name} ×{n}" for name, n in counts.most_common())


def valid_windows() -> list[list[int]]:
    from engine.data import read_text, token_windows
    from engine.model import open_source

    return token_windows(open_source(GGUF).tokenizer(), read_text(VALID_TXT), SEQ_LEN).tolist()


def perplexity_rows(cli: Cli, work: Path, windows: list[list[int]]) -> list[list[str]]:
    from engine.model import quantize_gguf

    rows = []
    for qtype in (*GGUF_PY_TYPES, *LLAMA_CPP_TYPES):
        path = work / f"{qtype}.gguf"
        if qtype in GGUF_PY_TYPES:
            quantize_gguf(GGUF, path, qtype)
            writer = "gguf-py"
        else:
            quantize_with_llama_cpp(GGUF, path, qtype)
            writer = "llama.cpp"
        ours = cli.evaluate(path, VALID_TXT, "--seq-len", SEQ_LEN)["ppl"]
        llama = LlamaCpp(path, SEQ_LEN)
        theirs = llama.perplexity(windows)
        llama.close()
        rows.append([qtype, writer, block_types(path), f"{ours:.4f}", f"{theirs:.4f}", f"{ours / theirs - 1:+.3%}"])
        print(rows[-1], flush=True)
    return rows


def export_rows(cli: Cli, work: Path, windows: list[list[int]]) -> list[list[str]]:
    """Finetuned on a Q8_0 GGUF; exported merged (F32, Q8_0) and as a LoRA; llama.cpp's logits against the
    engine's on the first window."""
    import torch

    from engine.export import attach_adapter
    from engine.model import load_model, quantize_gguf

    base = work / "export-base-Q8_0.gguf"
    quantize_gguf(GGUF, base, "Q8_0")
    cli.run("finetune", base, *FINETUNE, "--out", work / "run")
    tokens = windows[0]
    model, _, manifest = load_model(base)
    with torch.no_grad():
        base_logits = model(torch.tensor([tokens])).logits[0].double().numpy()
        attach_adapter(model, work / "run" / "adapter", base_manifest=manifest)
        ours = model(torch.tensor([tokens])).logits[0].double().numpy()
    effect = np.abs(ours - base_logits).max()
    rows = []
    for qtype in ("F32", "Q8_0"):
        out = work / f"export-{qtype}"
        cli.run("export", work / "run", "--gguf", qtype, "--out", out)
        llama = LlamaCpp(out / "gguf" / "model.gguf", SEQ_LEN)
        rows.append([f"`{qtype}` merged (`model.gguf`)", f"{np.abs(llama.logits(tokens) - ours).max():.2e}"])
        llama.close()
    plain = LlamaCpp(base, SEQ_LEN)
    base_gap = np.abs(plain.logits(tokens) - base_logits).max()
    plain.close()
    adapted = LlamaCpp(base, SEQ_LEN, lora_path=work / "export-Q8_0" / "gguf" / "lora.gguf")
    rows.append(["Q8_0 base + `lora.gguf`", f"{np.abs(adapted.logits(tokens) - ours).max():.2e}"])
    adapted.close()
    rows.append(["Q8_0 base alone, against the engine's base", f"{base_gap:.2e}"])
    rows.append(["(the adapter's own change of the logits, engine)", f"{effect:.2e}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser)
    args = parser.parse_args()
    with work_dir(args.work, "llama-cpp") as work:
        cli = Cli(work, args.threads)
        windows = valid_windows()
        ppl = perplexity_rows(cli, work, windows)
        export = export_rows(cli, work, windows)
    body = (
        f"Perplexity of stories260K on `tinystories/valid.txt` ({len(windows)} windows of {SEQ_LEN} tokens, the "
        "README's protocol) for each GGUF type, through the engine (the file's blocks kept packed and decoded by "
        "the engine's own kernels) and through llama.cpp (llama-cpp-python, built from PyPI on this machine) on the "
        "same token windows.  The stories260K matrices are 64 and 172 wide, so llama.cpp's quantizer stores the "
        "rows a type's block does not divide in a fallback type; \"block matrices\" lists what each file holds.  "
        "llama.cpp also rounds the activations to 8 bits for its quantized matmuls, which the engine does not: "
        "that is the difference left.\n\n"
        + table(["type", "written by", "block matrices", "engine ppl", "llama.cpp ppl", "engine / llama.cpp - 1"], ppl)
        + "\n\n## `modulora export --gguf` in llama.cpp\n\n"
        "A rank-4 LoRA finetuned (4 steps, lr 1e-2) on the Q8_0 file, exported with `--gguf F32` and `--gguf Q8_0`; "
        "the largest absolute difference between llama.cpp's logits and the engine's finetuned model's on the first "
        f"{SEQ_LEN}-token window.\n\n"
        + table(["llama.cpp runs", "max abs logit difference"], export)
    )
    write_doc("gguf_llama_cpp", "GGUF through the engine and through llama.cpp", "gguf_llama_cpp.py", body,
              cli.commands)


if __name__ == "__main__":
    main()
