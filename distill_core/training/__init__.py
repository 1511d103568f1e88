"""In-graph LoRA distillation: settings, LoRA adapters, objectives, the training loop and its headless CLI."""
