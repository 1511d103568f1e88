"""Few-step sampling: schedules, the k-diffusion-shaped samplers, pi-Flow policies, hybrid sampling, traces."""
