"""Stride: few-step diffusion samplers, hybrid diversity sampling and in-graph LoRA
distillation for ComfyUI. ComfyUI loads this file as the node pack's entry point."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
