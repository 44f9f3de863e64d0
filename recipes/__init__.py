"""YAML pipelines (quantize -> correct -> finetune -> evaluate -> export) and their runner."""
