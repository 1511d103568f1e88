"""The analytic reference that measures quality without real weights: Gaussian mixtures with exact denoiser and
flow map, the ODE solver, exact metrics, image diversity and the demo model's data."""
