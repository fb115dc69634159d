"""Modules over the op layer: fused layers, the models, the train step, losses, presets and the reference
(docs/design.md section 2)."""
