"""InstructBLIP: BLIP-2 whose Q-Former also reads the instruction.

The instruction's BERT tokens enter the Q-Former together with the learned queries (bi-directional
self-attention over ``[queries; instruction]``, cross-attention for the queries only), so the 32 query
outputs that become the LLM's soft prompt depend on the instruction; the text outputs are discarded. The
same instruction, tokenised by the LLM's tokenizer, follows the soft prompt in the LLM (decoder-only
Vicuna) or in the LLM's encoder (FlanT5)::

    prefix = model.llm_prefix(pixel_values, qformer_ids=instr_ids, qformer_mask=instr_mask)  # (B, Q, D_llm)
    logits = model.lm_logits(prefix, llm_ids, llm_mask)                                       # as BLIP-2 stage 2

Everything else (the ViT, the Q-Former layers, the LLM bridge, generation) is BLIP-2's; the Q-Former keeps
its text embeddings and text feed-forward blocks but has no MLM head and no ITC/ITM heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from vlkit.errors import ConfigError
from vlkit.models.blip2 import Blip2, Blip2Config
from vlkit.models.qformer import QFormerConfig


@dataclass
class InstructBlipConfig(Blip2Config):
    """An InstructBLIP model: a ``Blip2Config`` with an instruction-aware Q-Former and a required LLM.

    Defaults differ from BLIP-2's: the Q-Former has text input but no MLM head, and there are no ITC/ITM
    heads. ``lm`` must be set.
    """

    qformer: QFormerConfig = field(default_factory=lambda: QFormerConfig(lm_head=False))
    itc_itm_heads: bool = False

    instruction_aware = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lm is None:
            raise ConfigError("InstructBlipConfig.lm is required (InstructBLIP always drives an LLM)")
        if not self.qformer.text_input:
            raise ConfigError("InstructBlipConfig: the Q-Former needs text input (qformer.text_input=True)")


class InstructBlip(Blip2):
    """InstructBLIP: ``Blip2`` whose ``llm_prefix`` takes the instruction's Q-Former tokens.

    Args:
        config: the architecture.
        device: where to create the parameters ("meta" for a shape-only model).
        dtype: parameter dtype.
    """

    config: InstructBlipConfig

    def __init__(
        self,
        config: InstructBlipConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        if not isinstance(config, InstructBlipConfig):
            raise ConfigError(f"InstructBlip needs an InstructBlipConfig, got {type(config).__name__}")
        super().__init__(config, device=device, dtype=dtype)

    def llm_prefix(
        self,
        pixel_values: Tensor | None = None,
        *,
        image_embeds: Tensor | None = None,
        qformer_ids: Tensor | None = None,
        qformer_mask: Tensor | None = None,
    ) -> Tensor:
        """Projected query outputs (B, Q, D_llm) of the Q-Former pass over ``[queries; instruction]``.

        Args:
            pixel_values: (B, 3, S, S), or None when ``image_embeds`` (B, N, Dv) are given.
            qformer_ids, qformer_mask: (B, T) the instruction in Q-Former (BERT) tokens, ``[CLS] ... [SEP]``;
                None runs the queries alone (LAVIS's ``qformer_text_input=False`` variant).
        """
        return super().llm_prefix(
            pixel_values, image_embeds=image_embeds, qformer_ids=qformer_ids, qformer_mask=qformer_mask
        )
