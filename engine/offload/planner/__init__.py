"""Will a ModuLoRA finetuning run fit in memory, and how long will a step take?  Answered from shapes alone.

The plan lists every part of a training step's memory (packed decoder weights,
float parameters, LoRA weights and gradients, optimizer state, activations,
buffers), places each on the device, the host or the disk, and adds up the peak
of each memory.  Packed and parameter sizes are exact (the packed format's own
arithmetic); activations follow a model whose constants were measured
(``sizes``).  Gradient checkpointing is assumed on: it is what makes large
models fit.  On a CPU-only machine the "device" is host RAM: device and host are
one memory, and host-tier weights count against it like resident ones.

``inputs`` (what is planned), ``sizes`` (memory model), ``timing`` (time model),
``plan`` (a placement's parts, peaks and verdict), ``search`` (the placements tried),
``stages`` (the other commands: load, quantize, calibrate, correct, eval, export).
"""

from engine.offload.planner.inputs import PlanInputs
from engine.offload.planner.plan import Part, Plan
from engine.offload.planner.search import make_plan
from engine.offload.planner.sizes import GIB, MIB
from engine.offload.planner.stages import SOURCE_DTYPE_BYTES, STAGES, StageInputs, StagePlan, stage_plan
from engine.offload.planner.timing import StepTime, default_tflops

__all__ = ["GIB", "MIB", "SOURCE_DTYPE_BYTES", "STAGES", "Part", "Plan", "PlanInputs", "StageInputs", "StagePlan",
           "StepTime", "default_tflops", "make_plan", "stage_plan"]
