"""The plan use case: will a finetune fit its machine, and how long will a step take?  From shapes alone."""

from __future__ import annotations

from engine.offload.planner import Plan, PlanInputs, make_plan
from engine.offload.shapes import ModelShapes, load_config, model_shapes
from engine.pipelines.specs import PlanSpec


def plan(spec: PlanSpec) -> Plan:
    return make_plan(plan_inputs(spec, model_shapes(load_config(spec.model))))


def plan_inputs(spec: PlanSpec, shapes: ModelShapes) -> PlanInputs:
    """The planner's inputs for ``spec`` on a model of ``shapes``."""
    h = spec.hardware
    return PlanInputs(
        shapes, bits=spec.bits, rank=spec.rank, seq_len=spec.seq_len, batch=spec.batch,
        device_mem=h.device_mem if h.device_mem is not None else h.host_mem, host_mem=h.host_mem,
        group_size=spec.group_size, tier=spec.tier, prefetch=spec.prefetch, compute_dtype=spec.dtype,
        optimizer_offload=spec.optimizer_offload, device=h.device, disk_gbps=h.disk_gbps, h2d_gbps=h.h2d_gbps,
        tflops=h.tflops, dequant_gweights=h.dequant_gweights,
    )
