"""The plan use case: will a stage fit its machine (and, for a finetune, how long will a step take)?  From shapes
alone."""

from __future__ import annotations

from engine.offload.planner import Plan, PlanInputs, StageInputs, StagePlan, default_tflops, make_plan, stage_plan
from engine.offload.shapes import ModelShapes, load_config, model_shapes
from engine.pipelines.specs import SEQUENTIAL_ASYM_ALPHA, PlanSpec
from engine.quant.kernels import declared_rate


def plan(spec: PlanSpec) -> Plan | StagePlan:
    shapes = model_shapes(load_config(spec.model))
    if spec.stage == "finetune":
        return make_plan(plan_inputs(spec, shapes))
    h = spec.hardware
    return stage_plan(stage_inputs(spec, shapes), h.host_mem, h.device_mem if h.device != "cpu" else None)


def plan_inputs(spec: PlanSpec, shapes: ModelShapes) -> PlanInputs:
    """The planner's inputs for the finetune ``spec`` on a model of ``shapes``."""
    h = spec.hardware
    tflops, tflops_source = (h.tflops, "given") if h.tflops is not None else default_tflops(h.device, spec.dtype)
    dequant, dequant_source = ((h.dequant_gweights, "given") if h.dequant_gweights is not None
                               else declared_rate(h.device))
    return PlanInputs(
        shapes, bits=spec.bits, rank=spec.rank, seq_len=spec.seq_len, batch=spec.batch // spec.train_workers,
        workers=spec.train_workers,
        device_mem=h.device_mem if h.device_mem is not None else h.host_mem, host_mem=h.host_mem,
        group_size=spec.group_size, tier=spec.tier, prefetch=spec.prefetch, compute_dtype=spec.dtype,
        optimizer_offload=spec.optimizer_offload, device=h.device, disk_gbps=h.disk_gbps, h2d_gbps=h.h2d_gbps,
        tflops=tflops, dequant_gweights=dequant, tflops_source=tflops_source, dequant_source=dequant_source,
    )


def stage_inputs(spec: PlanSpec, shapes: ModelShapes) -> StageInputs:
    """The stage planner's inputs for ``spec``."""
    asym = spec.calib_mode == "sequential" and SEQUENTIAL_ASYM_ALPHA > 0
    return StageInputs(
        shapes, stage=spec.stage, method=spec.method, bits=spec.bits, group_size=spec.group_size,
        source_dtype=spec.source_dtype, compute_dtype=spec.dtype, calib_windows=spec.calib_windows,
        calib_seq_len=spec.calib_seq_len, asym=asym, workers=spec.workers, rank=spec.rank, seq_len=spec.seq_len,
        batch=spec.batch, tier=spec.tier, prefetch=spec.prefetch, distill=spec.distill_steps > 0,
        distill_windows=spec.distill_windows or spec.calib_windows, device=spec.hardware.device,
        shard_windows=spec.calib_shard_windows,
    )
