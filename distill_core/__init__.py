"""Stride's host-independent torch library.

* :mod:`.spaces` — noise conventions and the one copy of each formula (DDIM move, re-noising,
  prediction conversions); :mod:`.safe_files` — validated safetensors reading and atomic writing.
* :mod:`.sampling` — schedules, the few-step samplers (LCM, TCD, TDD, pi-Flow), hybrid sampling, traces.
* :mod:`.training` — LoRA adapters, distillation objectives, the training loop and its headless CLI.
* :mod:`.reference` — the analytic Gaussian-mixture reference, its ODE solver, exact metrics, image
  diversity and the demo model's data.

Arrows run one way: training -> sampling -> spaces; reference -> spaces. Nothing here imports ComfyUI;
``nodes/`` adapts these functions to ComfyUI types.
"""
