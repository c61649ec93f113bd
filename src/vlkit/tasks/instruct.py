"""Task ``instruct_tune``: InstructBLIP instruction tuning (blip2-spec.md §2.5).

The Q-Former reads the instruction with its queries (bi-directional self-attention over ``[queries;
instruction]``), so the visual soft prompt depends on what is asked; the LLM then reads ``[prefix;
instruction]`` and is trained to produce the response::

    prefix = projection(Q-Former(query_tokens ; BERT tokens of the instruction) [:, :Q])    (B, Q, D_llm)
    Vicuna (decoder-only):   [prefix; BOS instruction | response "</s>" | padding]   packed, only the
                             response is a target (instruction left-truncated at max_txt_len = 128, response
                             right-truncated at max_output_txt_len = 256)
    FlanT5 (encoder-decoder): encoder [prefix; instruction </s>], decoder targets response </s>

Initialisation: Q-Former (with its text embeddings and text feed-forward blocks, as InstructBLIP keeps
them), query tokens, ``ln_vision`` and ViT from a BLIP-2 stage-1 checkpoint — the only public checkpoint with
the Q-Former's text parts — plus the frozen LLM from a local transformers folder and a new projection; or an
InstructBLIP checkpoint to continue from. With a decoder-only LLM the tokenizer gets InstructBLIP-Vicuna's
overrides (``[PAD]`` added, bos = eos = unk = ``</s>``; the LLM's vocabulary grows by one) unless
``vicuna_tokens: false``. Frozen: ViT, LLM. Trained: Q-Former, query tokens, ``ln_vision``, projection.

Data (``train``): instruction JSONL records, and caption / VQA data turned into instructions — a caption
source with ``prompts`` (e.g. "A short image caption.") makes the caption the response; a VQA source's
templates (e.g. "Question: {} Short answer:") make the question the instruction and its answer the response.
The rest (evaluation, export, frozen-feature cache) is shared with the BLIP-2 tasks, see
:mod:`vlkit.tasks.stage2`.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlkit.errors import ConfigError
from vlkit.tasks.stage2 import LMTaskConfig, assemble_stage2, build_task
from vlkit.training.task import TaskContext, TaskState


@dataclass
class InstructConfig(LMTaskConfig):
    """Options of the ``instruct_tune`` task (see :class:`vlkit.tasks.stage2.LMTaskConfig`), plus:

    Attributes:
        vicuna_tokens: decoder-only LLMs: apply InstructBLIP-Vicuna's tokenizer overrides (``[PAD]`` token,
            bos = eos = unk = ``</s>``), as LAVIS does for every Vicuna model.
    """

    vicuna_tokens: bool = True


def build(cfg: InstructConfig, ctx: TaskContext) -> TaskState:
    """Build the ``instruct_tune`` task (see :mod:`vlkit.training.task` for the contract)."""
    if not isinstance(cfg, InstructConfig):
        raise ConfigError(f"vlkit.tasks.instruct cannot build a {type(cfg).__name__}")
    if cfg.image_size is not None:
        raise ConfigError("task.image_size: instruction tuning keeps the image size of its init")
    assembled = assemble_stage2(cfg, instruction=True, vicuna_tokens=cfg.vicuna_tokens)
    return build_task(cfg, ctx, assembled, task="instruct_tune", default_join="pack")
