"""ComfyUI adapters for Stride: one module per feature family, merged here."""
from . import hybrid, piflow, piflow_loader, reference, samplers, training

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in (hybrid, piflow, piflow_loader, reference, samplers, training):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
