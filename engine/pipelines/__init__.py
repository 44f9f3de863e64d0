"""The application layer: one function per use case, each taking a typed spec with the one set of defaults.

The command line, the recipe runner and the sweep trials build specs and call these, in process::

    quantize(QuantizeSpec(...))     correct(CorrectSpec(...))     finetune(FinetuneSpec(...))
    evaluate(EvalSpec(...))         export(ExportSpec(...))       plan(PlanSpec(...))
"""

from engine.pipelines.commandline import as_params, command_line, options, quantize_options, quantize_spec, spec_from
from engine.pipelines.correction import correct
from engine.pipelines.evaluation import evaluate
from engine.pipelines.exporting import export
from engine.pipelines.finetuning import finetune
from engine.pipelines.loading import ADAPTER_DIR, load_with_adapter
from engine.pipelines.planning import plan, plan_inputs
from engine.pipelines.quantization import quantize
from engine.pipelines.specs import (
    ALPHA_PER_RANK,
    COMPUTE_DTYPES,
    GGUF_METHOD,
    CalibSpec,
    CorrectSpec,
    DataSpec,
    EvalSpec,
    ExportSpec,
    FinetuneSpec,
    HardwareSpec,
    LoraSpec,
    OffloadSpec,
    ParallelSpec,
    PlanSpec,
    QuantizeSpec,
    TaskSpec,
    TrainSpec,
)

__all__ = [
    "ADAPTER_DIR", "ALPHA_PER_RANK", "COMPUTE_DTYPES", "GGUF_METHOD", "CalibSpec", "CorrectSpec", "DataSpec", "EvalSpec",
    "ExportSpec", "FinetuneSpec", "HardwareSpec", "LoraSpec", "OffloadSpec", "ParallelSpec", "PlanSpec", "QuantizeSpec", "TaskSpec",
    "TrainSpec", "as_params", "command_line", "correct", "evaluate", "export", "finetune", "load_with_adapter", "options", "plan", "plan_inputs", "quantize", "quantize_options", "quantize_spec",
    "spec_from",
]
