"""Declarative training jobs (SFT, DPO, RL, distillation, atomic batches) that run through a
tuneforge server's public Tinker API with the `tinker` SDK and the cookbook's renderers."""
