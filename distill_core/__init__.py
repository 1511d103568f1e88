"""Stride's host-independent torch library: schedules, few-step samplers, pi-Flow policies,
hybrid sampling, distillation objectives, LoRA I/O, metrics and the reference teacher.

Nothing here imports ComfyUI; ``nodes/`` adapts these functions to ComfyUI types.
"""
