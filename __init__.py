"""Stride: few-step diffusion samplers, hybrid diversity sampling and in-graph LoRA distillation
for ComfyUI. ComfyUI loads this file as the node pack's entry point.

The nodes are V3 nodes, registered through ``comfy_entrypoint`` only: a pack that also exported
``NODE_CLASS_MAPPINGS`` would be loaded the V1 way (ComfyUI 0.3.75 and 0.33 check that first).
``WEB_DIRECTORY`` (the live loss chart) is read either way.
"""
from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
