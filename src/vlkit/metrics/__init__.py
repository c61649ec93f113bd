"""Evaluation metrics as pure functions: COCO caption scores, VQA accuracy, retrieval recall, classification.

Import the submodule you need (``vlkit.metrics.caption``, ``.vqa``, ``.retrieval``, ``.classification``,
``.ptb``, ``.report``); nothing heavy is imported here.
"""
