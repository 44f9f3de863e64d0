"""The typed specs of every use case, holding the one set of defaults.

The command line (``engine.cli``), the recipes and the sweep trials only build
these specs and hand them to the use-case functions of this package.  Every
setting is declared once, with :func:`~engine.options.setting`; the flags,
recipe keys, help texts and checks are derived from the declarations.  A spec
is checked when it is made: settings one by one, then ``validate`` for their
combinations, raising :class:`~engine.options.SettingError` with the setting's
path so each entry point names it as its user wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.data import FORMATS, FormatSpec
from engine.model import MODES, SHARD_WINDOWS, is_quantized_dir, is_quantized_gguf
from engine.offload import TIERS
from engine.offload.planner import SOURCE_DTYPE_BYTES, STAGES
from engine.options import SettingError, Spec, default_of, setting
from engine.placement import DEVICES
from engine.quant import Quantizer, make_quantizer, quantizer_class
from engine.quant.packing import SUPPORTED_BITS
from engine.train import SCHEDULES, TrainSpec

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GGUF_METHOD = "gguf"  # keep the quants of an already-quantized GGUF file as they are
ALPHA_PER_RANK = 2.0  # LoRA alpha when none is given: 2 x rank (the adapter's scale alpha / rank is then 2)
SEQUENTIAL_ASYM_ALPHA = 0.5  # GPTAQ pull towards the float model, best measured for OPTQ and QuIP# (docs/quality.md)


def device_setting() -> str:
    """The ``device`` setting every use case takes (recipes: ``hardware.device``)."""
    return setting("auto", "str", "Compute device: auto (cuda when this process sees a GPU), cuda or cpu.",
                   choices=DEVICES)


@dataclass(frozen=True)
class LoraSpec(Spec):
    """The adapter: LoRA of one rank, or QDyLoRA training every rank 1..rank_max at once."""

    rank: int = setting(8, "int", "LoRA rank.", minimum=1)
    alpha: float | None = setting(None, "float", "LoRA alpha; the adapter's scale is alpha / rank [2 x rank].",
                                  minimum=0.0, above=True, optional=True)
    dynamic: bool = setting(False, "bool", "QDyLoRA: sample the rank from 1..rank_max every step.")
    rank_max: int | None = setting(None, "int", "QDyLoRA: the largest rank trained.", minimum=1, optional=True)
    frozen: bool = setting(False, "bool", "QDyLoRA: update only the sampled rank's component.")
    rank_schedule: str = setting("uniform", "str", "QDyLoRA: the ranks each step trains at (docs/qdylora.md).",
                                 choices=SCHEDULES)

    def validate(self) -> None:
        if self.dynamic and self.rank_max is None:
            raise SettingError("rank_max", "required when {0} is true (ranks 1..rank_max)", ("dynamic",))
        if self.rank_max is not None and not self.dynamic:
            raise SettingError("rank_max", "only for a dynamic-rank run; set {0}", ("dynamic",))
        if self.frozen and not self.dynamic:
            raise SettingError("frozen", "a QDyLoRA variant; it needs {0}", ("dynamic",))
        if self.rank_schedule != "uniform" and not self.dynamic:
            raise SettingError("rank_schedule", "a QDyLoRA setting; it needs {0}", ("dynamic",))

    @property
    def adapter_rank(self) -> int:
        """The rank of the adapter's matrices (``rank_max`` for a dynamic-rank run)."""
        return self.rank_max if self.dynamic else self.rank

    @property
    def scale_alpha(self) -> float:
        return self.alpha if self.alpha is not None else ALPHA_PER_RANK * self.adapter_rank


@dataclass(frozen=True)
class DataSpec(Spec):
    """A local data file and how to read it."""

    file: str = setting(kind="data", help="Data: a txt, json, jsonl, csv, tsv or parquet file (also .gz, .bz2, .xz, "
                        ".zst), a datasets save_to_disk folder, or a hub dataset id.", flag="--data")
    split: str | None = setting(None, "str", "Split of a datasets folder or hub dataset [train].", optional=True)
    format: str = setting("text", "str", "How rows become token sequences.", choices=FORMATS)
    columns: dict[str, str] = setting({}, "map", "Column for a role, e.g. text=sentence (ROLE=NAME).",
                                      flag="--column")
    label_words: dict[str, str] = setting({}, "map", "Word a class label is spoken as, e.g. 0=negative.",
                                          flag="--label-word")
    template: str | None = setting(None, "str", "Prompt template, e.g. '{text}\\nAnswer:'.", optional=True)
    limit: int | None = setting(None, "int", "Use at most this many rows (windows, for text).", minimum=1,
                                optional=True)
    seq_len: int = setting(256, "int", "Tokens per sequence.", minimum=2)

    def validate(self) -> None:
        if self.format == "classification" and not self.label_words:
            raise SettingError("label_words", "a classification set needs its label words, e.g. {0: negative}")

    def format_spec(self) -> FormatSpec:
        return FormatSpec(self.format, dict(self.columns), self.template, dict(self.label_words), self.split)


@dataclass(frozen=True)
class OffloadSpec(Spec):
    """Where the packed decoder weights and the optimizer state live while training."""

    tier: str | None = setting(None, "str", "Stream the decoder blocks' packed weights from this tier "
                               "[none: resident].", choices=TIERS, optional=True, flag="--offload")
    dir: str | None = setting(None, "path", "Block files of the disk tier [OUT/blocks].", optional=True,
                              flag="--offload-dir")
    prefetch: int = setting(1, "int", "Blocks fetched ahead of the one computing.", minimum=0)
    optimizer: bool = setting(False, "bool", "Keep float32 masters and Adam moments in host memory "
                              "(optimizer cpu_adam).", flag="--offload-optimizer")

    def validate(self) -> None:
        if self.dir is not None and self.tier != "disk":
            raise SettingError("dir", f"only the disk tier keeps block files, but {{0}} is {self.tier!r}", ("tier",))


@dataclass(frozen=True)
class ParallelSpec(Spec):
    """Data parallelism on Ray Train (recipes: ``cluster.train_workers``, ``cluster.threads``, ``cluster.address``):
    one worker per GPU, or per CPU slot on a CPU cluster, each taking its share of every global batch."""

    workers: int = setting(1, "int", "Data-parallel workers on Ray Train, one per GPU or CPU slot; --batch-size "
                           "is the global micro-batch, split among them [1: this process alone].", minimum=1)
    threads: int = setting(1, "int", "CPU threads per worker (CPU workers).", minimum=1)
    address: str | None = setting(None, "str", "Ray cluster to run the workers on [a private Ray on 127.0.0.1].",
                                  optional=True)
    max_failures: int = setting(3, "int", "Restarts of the worker group from its last checkpoint after a worker "
                                "or node fails.", minimum=0)

    @property
    def on_ray(self) -> bool:
        return self.workers > 1 or self.address is not None


def _check_split(batch: int, workers: int, batch_field: str, workers_field: str) -> None:
    """A global batch of ``batch`` sequences must split evenly among ``workers`` data-parallel workers."""
    if batch % workers:
        raise SettingError(batch_field, f"{batch} must split evenly among the {{0}} ({workers}): each takes its "
                           "share of the global micro-batch", (workers_field,))


@dataclass(frozen=True)
class FinetuneSpec(Spec):
    """LoRA on a float model, ModuLoRA on a quantized one, or more training of a corrected one."""

    model: str = setting(kind="model", help="Float model, quantized directory or corrected directory.")
    data: DataSpec
    out: str = setting(kind="path", help="Run directory.")
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    dtype: str = setting("float32", "str", "Compute dtype of the base matmuls.", choices=tuple(COMPUTE_DTYPES))
    eval_data: str | None = setting(None, "file", "Text file for perplexity during training.", optional=True)
    eval_limit: int = setting(64, "int", "Windows of eval_data evaluated.", minimum=1)
    offload: OffloadSpec = field(default_factory=OffloadSpec)
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    resume: bool = setting(False, "bool", "Continue from the newest good checkpoint in the run directory.")
    overwrite: bool = setting(False, "bool", "Start again in a folder that holds a run, deleting it.")
    force: bool = setting(False, "bool", "With --resume: continue although settings differ from the run's.")
    device: str = device_setting()

    def validate(self) -> None:
        _check_split(self.train.batch_size, self.parallel.workers, "train.batch_size", "parallel.workers")
        if self.train.eval_every and self.eval_data is None:
            raise SettingError("train.eval_every", "needs {0}", ("eval_data",))
        if self.offload.optimizer and self.train.optimizer != "cpu_adam":
            raise SettingError("offload.optimizer", "keeping optimizer state on the host needs {0} cpu_adam",
                               ("train.optimizer",))


@dataclass(frozen=True)
class CorrectSpec(Spec):
    """LREC: LoRA on a quantized model trained to match its float teacher (KL + cross-entropy)."""

    model: str = setting(kind="model", help="Quantized directory.")
    calib: str = setting(kind="file", help="Text the student learns to match the teacher on.")
    out: str = setting(kind="path", help="Output: the corrected model directory.")
    teacher: str | None = setting(None, "model", "Float model [the source model recorded in the directory].",
                                  optional=True)
    rank: int = setting(default_of(LoraSpec, "rank"), "int", "LoRA rank.", minimum=1)
    alpha: float | None = setting(None, "float", "LoRA alpha [2 x rank].", minimum=0.0, above=True, optional=True)
    init: str = setting("loftq", "str", "Adapter initialisation: loftq (SVD of the quantization error, the base "
                        "re-quantized around it; a distilled base is kept) or zero.", choices=("loftq", "zero"))
    loftq_iters: int = setting(4, "int", "LoftQ alternations of quantize and SVD.", minimum=1)
    ce_weight: float = setting(1.0, "float", "Weight of cross-entropy next to KL.", minimum=0.0)
    limit: int | None = setting(None, "int", "Use at most this many windows.", minimum=1, optional=True)
    seq_len: int = setting(default_of(DataSpec, "seq_len"), "int", "Tokens per window.", minimum=2)
    train: TrainSpec = field(default_factory=TrainSpec)
    offload: OffloadSpec = field(default_factory=OffloadSpec)
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    resume: bool = setting(False, "bool", "Continue from the newest good checkpoint.")
    overwrite: bool = setting(False, "bool", "Start again in a folder that holds a run, deleting it.")
    force: bool = setting(False, "bool", "With --resume: continue although settings differ from the run's.")
    device: str = device_setting()

    def validate(self) -> None:
        _check_split(self.train.batch_size, self.parallel.workers, "train.batch_size", "parallel.workers")
        if self.offload.optimizer and self.train.optimizer != "cpu_adam":
            raise SettingError("offload.optimizer", "keeping optimizer state on the host needs {0} cpu_adam",
                               ("train.optimizer",))

    @property
    def lora(self) -> LoraSpec:
        return LoraSpec(rank=self.rank, alpha=self.alpha)


@dataclass(frozen=True)
class TaskSpec(Spec):
    """One evaluation: a data file and how to score it (perplexity, accuracy or ROUGE by its format)."""

    data: DataSpec
    batch_size: int = setting(8, "int", "Windows per forward pass (perplexity).", minimum=1)
    ranks: tuple[int, ...] | None = setting(None, "int", "Ranks to evaluate a dynamic-rank adapter at.",
                                            minimum=1, optional=True, many=True)
    name: str | None = setting(None, "str", "Label in the results [the file's name].", optional=True)

    @property
    def label(self) -> str:
        return self.name or Path(self.data.file).stem


@dataclass(frozen=True)
class EvalSpec(Spec):
    """A model (float, quantized, corrected or finetuned) scored on one or more tasks."""

    model: str = setting(kind="model", help="Model, quantized or corrected directory, or finetune run.")
    tasks: tuple[TaskSpec, ...] = ()
    offload: OffloadSpec = field(default_factory=OffloadSpec)
    device: str = device_setting()

    def validate(self) -> None:
        if not self.tasks:
            raise SettingError("tasks", "missing")
        if self.offload.optimizer:
            raise SettingError("offload.optimizer", "evaluation has no optimizer")


GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")  # what gguf-py writes


@dataclass(frozen=True)
class ExportSpec(Spec):
    """A run's adapter as a PEFT adapter, and optionally merged into a float model."""

    run: str = setting(kind="path", help="A finetune run or corrected directory.")
    out: str = setting(kind="path", help="Output directory.")
    rank: int | None = setting(None, "int", "Cut a dynamic-rank adapter to this rank.", minimum=1, optional=True)
    merged: bool = setting(False, "bool", "Also write a merged float model (transformers format) to OUT/merged.")
    gptq: bool = setting(False, "bool", "Also write the quantized base (rtn, optq) in the hub GPTQ layout to OUT/gptq, "
                         "for GPTQ kernels to serve with OUT/adapter.")
    gguf: str | None = setting(None, "str", "Also write OUT/gguf for llama.cpp: the merged model with its decoder "
                               "linears in this GGUF type (model.gguf) and the adapter as a GGUF LoRA (lora.gguf); "
                               "for models that came from a GGUF file.", choices=GGUF_TYPES, optional=True)
    overwrite: bool = setting(False, "bool", "Replace an output folder that holds something.")
    dtype: str = setting("float32", "str", "Float dtype of the merged model.", choices=tuple(COMPUTE_DTYPES))
    device: str = device_setting()


@dataclass(frozen=True)
class CalibSpec(Spec):
    """Calibration data: seeded random windows of a text file."""

    file: str = setting(kind="file", help="Calibration text (UTF-8).", flag="--calib")
    windows: int = setting(128, "int", "Calibration windows.", minimum=1, flag="--calib-windows")
    seq_len: int = setting(256, "int", "Tokens per calibration window.", minimum=2, flag="--calib-seq-len")
    mode: str = setting("sequential", "str", "sequential: each block calibrated on the quantized blocks before it; "
                        "independent: all on the float model.", choices=MODES, flag="--calib-mode")
    asym_alpha: float | None = setting(None, "float", "Pull each layer towards the float model's output (GPTAQ), "
                                       f"0 to 1 [{SEQUENTIAL_ASYM_ALPHA} sequential, 0 independent].",
                                       minimum=0.0, maximum=1.0, optional=True)
    shard_windows: int = setting(SHARD_WINDOWS, "int", "Calibration windows per statistics shard; shards are "
                                 "summed in order, so the weights depend on this, never on how many Ray workers "
                                 "hold the shards (a shard is the unit of their data parallelism).", minimum=1)
    seed: int = setting(0, "int", "Seed of the windows and of a randomized method.", minimum=0)
    distill_steps: int = setting(0, "int", "After rounding, steps tuning the continuous parameters (embeddings, "
                                 "norms, head, row scales) towards the float model (QuIP#'s fine-tuning); 0: none.",
                                 minimum=0)
    distill_lr: float = setting(3e-3, "float", "Learning rate of the distillation.", minimum=0.0, above=True)
    distill_batch: int = setting(16, "int", "Calibration windows per distillation step.", minimum=1)
    distill_windows: int | None = setting(None, "int", "Windows of the calibration text the distillation trains "
                                          "on, drawn apart from the calibration's [the calibration windows].",
                                          minimum=1, optional=True)

    def validate(self) -> None:
        if self.asym_alpha and self.mode != "sequential":
            raise SettingError("asym_alpha", "needs {0} sequential", ("mode",))

    @property
    def asym(self) -> float:
        if self.asym_alpha is not None:
            return self.asym_alpha
        return SEQUENTIAL_ASYM_ALPHA if self.mode == "sequential" else 0.0


@dataclass(frozen=True)
class QuantizeSpec(Spec):
    """A float model's decoder linears quantized by one method into a quantized directory.

    ``options`` are the method's own settings that were given; the others are
    the method's declared defaults (``engine.quant``: each method's ``options``).
    """

    model: str = setting(kind="model", help="Float model: GGUF file, Hugging Face directory or hub id.")
    out: str = setting(kind="path", help="Output directory.")
    overwrite: bool = setting(False, "bool", "Replace an output folder that holds something.")
    method: str = setting("rtn", "str", "Quantizer: rtn, optq, quip, nf4, fp4, hqq, or gguf (keep a quantized "
                          "GGUF file's own quants).")
    options: dict[str, Any] = field(default_factory=dict)
    calib: CalibSpec | None = None
    device: str = device_setting()

    def validate(self) -> None:
        if is_quantized_dir(self.model):
            raise SettingError("model", f"{self.model} is already a quantized directory; quantize its float source")
        if self.method == GGUF_METHOD:
            given = [*self.options, *(["calib"] if self.calib else [])]
            if given:
                raise SettingError(given[0], "method 'gguf' keeps the file's own quants and takes no settings")
            if not (Path(self.model).is_file() and is_quantized_gguf(self.model)):
                raise SettingError("method", "'gguf' needs {0} to be a GGUF file with quantized weights, but "
                                   f"{self.model} holds float weights; pick rtn, optq, quip, nf4, hqq, ...", ("model",))
            return
        quantizer = self.quantizer()
        if quantizer.needs_calibration and self.calib is None:
            raise SettingError("calib", f"method {self.method!r} needs calibration data")
        if not quantizer.needs_calibration and self.calib is not None:
            raise SettingError("calib", f"method {self.method!r} does not use calibration data")

    def quantizer(self) -> Quantizer:
        quantizer_class(self.method)  # an unknown method is named as such
        return make_quantizer(self.method, seed=self.calib.seed if self.calib else 0, **self.options)


@dataclass(frozen=True)
class HardwareSpec(Spec):
    """The machine a finetune is planned for."""

    host_mem: int = setting(kind="size", help="Host memory, e.g. 64GiB.")
    device: str = setting("cuda", "str", "cpu: the device is host RAM.", choices=("cuda", "cpu"))
    device_mem: int | None = setting(None, "size", "Device memory, e.g. 24GiB (not with device cpu).",
                                     optional=True)
    disk_gbps: float = setting(1.0, "float", "Disk read rate, GB/s.", minimum=0.0, above=True)
    h2d_gbps: float = setting(25.0, "float", "Host-to-device copy rate, GB/s.", minimum=0.0, above=True)
    tflops: float | None = setting(None, "float", "Matmul rate, TFLOP/s [measured on this CPU; 150 assumed on cuda].",
                                   minimum=0.0, above=True, optional=True)
    dequant_gweights: float | None = setting(None, "float", "Dequantization rate, G weights/s [the device's kernel's "
                                             "declared rate].", minimum=0.0, above=True, optional=True)

    def validate(self) -> None:
        if self.device == "cuda" and self.device_mem is None:
            raise SettingError("device_mem", "required for device cuda, e.g. 24GiB")
        if self.device == "cpu" and self.device_mem not in (None, self.host_mem):
            raise SettingError("device_mem", "with device cpu the device memory is host memory: give host_mem only")


def _default_quantizer() -> dict[str, Any]:
    return make_quantizer(default_of(QuantizeSpec, "method")).settings


@dataclass(frozen=True)
class PlanSpec(Spec):
    """A stage to plan from its model's shapes alone (a finetune by default): its defaults are the stage's and the
    quantizer's."""

    model: str = setting(kind="str", help="Built-in shape (llama-7b/13b/30b/65b, llama-2-70b, falcon-40b) or a "
                         "config.json.")
    hardware: HardwareSpec
    stage: str = setting("finetune", "str", "What to plan: the command of that name (load: a quantized model held "
                         "in memory).", choices=STAGES)
    method: str = setting(default_of(QuantizeSpec, "method"), "str", "Quantizer (quantize, calibrate).")
    source_dtype: str = setting("bfloat16", "str", "The float checkpoint's dtype (quantize, calibrate, correct).",
                                choices=tuple(SOURCE_DTYPE_BYTES))
    calib_windows: int = setting(default_of(CalibSpec, "windows"), "int", "Calibration windows.", minimum=1)
    calib_seq_len: int = setting(default_of(CalibSpec, "seq_len"), "int", "Tokens per calibration window.",
                                 minimum=2)
    calib_mode: str = setting(default_of(CalibSpec, "mode"), "str", "Calibration mode (sequential adds GPTAQ's "
                              "float twin).", choices=MODES)
    calib_shard_windows: int = setting(default_of(CalibSpec, "shard_windows"), "int", "Calibration windows per "
                                       "statistics shard (quantize, calibrate).", minimum=1)
    distill_steps: int = setting(default_of(CalibSpec, "distill_steps"), "int", "Distillation steps after "
                                 "rounding (quantize).", minimum=0)
    distill_windows: int | None = setting(None, "int", "Windows the distillation trains on (quantize) [the "
                                          "calibration windows].", minimum=1, optional=True)
    workers: int = setting(2, "int", "Ray workers (calibrate).", minimum=1)
    train_workers: int = setting(1, "int", "Data-parallel workers on this node (finetune): each plans for its share "
                                 "of --batch, one device each; on a CPU all share the one memory.", minimum=1)
    bits: int = setting(_default_quantizer()["bits"], "int", "Bits per weight.", choices=SUPPORTED_BITS)
    group_size: int = setting(_default_quantizer()["group_size"], "int", "Columns per scale; -1 for one per row.",
                              minimum=-1)
    rank: int = setting(default_of(LoraSpec, "rank"), "int", "LoRA rank (rank_max, for a dynamic-rank run).",
                        minimum=1)
    seq_len: int = setting(default_of(DataSpec, "seq_len"), "int", "Tokens per sequence.", minimum=1)
    batch: int = setting(default_of(TrainSpec, "batch_size"), "int", "Sequences per step.", minimum=1)
    tier: str = setting("auto", "str", "Where the packed weights live; auto: the fastest that fits.",
                        choices=("auto", *TIERS))
    prefetch: int = setting(default_of(OffloadSpec, "prefetch"), "int", "Blocks fetched ahead.", minimum=0)
    compute_dtype: str | None = setting(None, "str", "Compute dtype [bfloat16 on cuda, the finetune's on cpu].",
                                        choices=tuple(COMPUTE_DTYPES), optional=True)
    optimizer_offload: str = setting("auto", "str", "Optimizer state on the host: auto, yes or no.",
                                     choices=("auto", "yes", "no"))

    def validate(self) -> None:
        if self.group_size == 0:
            raise SettingError("group_size", "expected a positive integer or -1 (one group per row), got 0")
        _check_split(self.batch, self.train_workers, "batch", "train_workers")

    @property
    def dtype(self) -> str:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return "bfloat16" if self.hardware.device == "cuda" else default_of(FinetuneSpec, "dtype")
