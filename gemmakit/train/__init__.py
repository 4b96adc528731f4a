"""Training and distillation: packed data, losses, trainer, teacher cache, multi-device helpers."""
