"""The generic trainer behind ``vlkit train``.

- :mod:`~vlkit.training.task` — the contract a task fulfils (``build(cfg, ctx) -> TaskState``)
- :mod:`~vlkit.training.recipe` — typed recipes (task section + optim / schedule / run)
- :mod:`~vlkit.training.loop` — ``train(recipe, output_dir=, resume=)``, the one training loop
- :mod:`~vlkit.training.optim`, :mod:`~vlkit.training.schedule` — AdamW groups, lr schedules
- :mod:`~vlkit.training.dist` — torchrun process groups, resumable sharded batch sampler, seeding
- :mod:`~vlkit.training.checkpointing` — atomic, exactly resumable checkpoints
- :mod:`~vlkit.training.logging`, :mod:`~vlkit.training.plot` — JSONL metrics, progress bar, PNG curves
- :mod:`~vlkit.training.feature_cache` — frozen-encoder feature cache

Nothing is imported here, so ``import vlkit.training.recipe`` does not pull in the loop.
"""
