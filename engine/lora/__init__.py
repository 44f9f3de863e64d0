"""LoRA layers over packed quantized weights."""

from engine.lora.function import ModuLoRAFunction
from engine.lora.linear import ModuLoRALinear

__all__ = ["ModuLoRAFunction", "ModuLoRALinear"]
