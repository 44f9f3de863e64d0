"""ModuLoRA Engine: finetune quantized large language models.

Data flows top-down through the sub-packages:
``quant`` (packed weights and quantizers) -> ``lora`` (ModuLoRA layers) ->
``model`` (load, quantize, save whole models) -> ``eval`` -> ``cli``.
"""

__version__ = "0.1.0"
