"""The finetune use case: LoRA on a float model, ModuLoRA on a quantized one, more training of a corrected one.

Output layout of a run directory::

    adapter/              PEFT-format adapter (engine.export.peft_format)
    checkpoints/step-N/   resumable training state
    metrics.jsonl, tensorboard/, report.json (with the spec the run was made from)
    ray/                  Ray Train's own copies of the checkpoints (a run on --workers)
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.data import build_examples, check_data, text_for, token_windows
from engine.eval import perplexity
from engine.export import save_adapter
from engine.model import add_lora, check_context, lora_layers, model_size
from engine.options import as_plain
from engine.placement import Placement
from engine.pipelines.loading import (
    ADAPTER_DIR, ADAPTER_INIT_DEVICE, attach_offload, load_with_adapter, pad_id, streams_in_place,
)
from engine.pipelines.launching import run_training
from engine.pipelines.specs import COMPUTE_DTYPES, FinetuneSpec, LoraSpec
from engine.pipelines.locking import holding_outputs
from engine.pipelines.runs import RUN_SPEC, check_run_folder, record_run
from engine.storage import atomic_write_json
from engine.train import EvalFn, Trainer, WorkerGroup

REPORT = "report.json"


@holding_outputs(lambda spec: (spec.out, spec.offload.dir), lambda spec: (spec.model, spec.data.file))
def finetune(spec: FinetuneSpec) -> dict[str, Any]:
    """Train, save the adapter and ``report.json`` in ``spec.out``; returns the report.

    With ``spec.offload.tier`` the decoder blocks' packed weights live on that
    tier and are streamed in block by block; the updates are the same bit for bit.
    On the disk tier a quantized directory is streamed from its own files.  With
    ``spec.parallel.workers`` the training is spread over a Ray Train worker group.
    """
    out = Path(spec.out)
    check_data(spec.data.file, spec.data.format_spec())
    check_run_folder(spec, out, out / RUN_SPEC)
    run_training(functools.partial(train_worker, spec), spec.parallel, spec.device, out, spec.train.keep_last)
    return json.loads((out / REPORT).read_text())


def train_worker(spec: FinetuneSpec, group: WorkerGroup) -> None:
    """The finetune on one worker of ``group`` (the only one, in one process); worker 0 writes the outputs."""
    out = Path(spec.out)
    placement = Placement.of(spec.device, COMPUTE_DTYPES[spec.dtype])
    model, tokenizer, _ = load_with_adapter(spec.model, stream=streams_in_place(spec.model, spec.offload))
    check_context(model.config, spec.data.seq_len, "--seq-len")
    if group.rank == 0:
        record_run(spec, out / RUN_SPEC)
    prepare_adapters(model, spec.lora, spec.train.seed, spec.dtype)
    examples = build_examples(spec.data.file, spec.data.format_spec(), tokenizer, spec.data.seq_len, spec.data.limit)
    eval_fn = _perplexity_eval(tokenizer, spec) if spec.eval_data else None
    size = model_size(model)  # before offloading: the same figures as a resident run
    streamer = attach_offload(model, spec.model, spec.offload, out / "blocks", placement.device, group)
    trainer = Trainer(model, examples, spec.train, out, pad_id(tokenizer), rank_max=spec.lora.rank_max,
                      rank_schedule=spec.lora.rank_schedule, dynamic_frozen=spec.lora.frozen,
                      host_optimizer=spec.offload.optimizer, eval_fn=eval_fn, device=placement.device, group=group)
    placement.reset_peak()
    start = time.perf_counter()
    try:
        metrics = trainer.train(resume=spec.resume)
    finally:
        if streamer is not None:
            streamer.close()
    seconds = time.perf_counter() - start
    if group.rank != 0:
        return
    save_adapter(model, out / ADAPTER_DIR, str(spec.model))
    report = {"spec": as_plain(spec), "examples": len(examples), "final": metrics, "train_seconds": seconds,
              "size": size, "placement": placement.describe(), "workers": group.size,
              "resumed_from_step": trainer.start_step}
    if streamer is not None:
        report["offload"] = {"tier": spec.offload.tier, "prefetch": spec.offload.prefetch,
                             "bytes_fetched": streamer.store.bytes_fetched, "max_blocks_resident": streamer.max_resident}
    atomic_write_json(out / REPORT, report)


def prepare_adapters(model: PreTrainedModel, lora: LoraSpec, seed: int, dtype: str) -> None:
    """Fresh adapters, unless the model (a corrected one) already carries one: then training goes on from it."""
    if not lora_layers(model):
        add_lora(model, lora.adapter_rank, lora.scale_alpha, seed=seed, device=ADAPTER_INIT_DEVICE)
    for layer in lora_layers(model).values():
        layer.compute_dtype = COMPUTE_DTYPES[dtype]


def _perplexity_eval(tokenizer: PreTrainedTokenizerBase, spec: FinetuneSpec) -> EvalFn:
    text = text_for(tokenizer, spec.eval_data, spec.eval_limit * spec.data.seq_len)
    windows = token_windows(tokenizer, text, spec.data.seq_len)[: spec.eval_limit]
    return lambda model: {"ppl": perplexity(model, windows, progress=False).ppl}
