"""Reading, writing and converting checkpoints (LAVIS, transformers, unilm VLMo, vlkit's own)."""
