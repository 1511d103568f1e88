"""ComfyUI adapters for Stride: one module per feature family, each listing its V3 nodes in ``NODES``.

:class:`StrideExtension` is what the pack's ``comfy_entrypoint`` returns to ComfyUI.
"""
from __future__ import annotations

from . import families, hybrid, optimal_steps, piflow, piflow_loader, reference, results, samplers, training
from .compat import ComfyExtension, checked_at_the_boundary, io

MODULES = (families, hybrid, optimal_steps, piflow, piflow_loader, reference, results, samplers, training)
NODES: list[type[io.ComfyNode]] = [checked_at_the_boundary(node) for module in MODULES for node in module.NODES]


class StrideExtension(ComfyExtension):
    """Stride's nodes for ComfyUI's V3 extension loader."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> StrideExtension:
    """ComfyUI's V3 entry point (both 0.3.75 and 0.33 await it when the pack has no NODE_CLASS_MAPPINGS)."""
    return StrideExtension()
