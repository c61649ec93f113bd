"""BLIP-2 stage 1: a frozen ViT, ``ln_vision``, learned queries, the Q-Former and the ITC/ITM/ITG heads.

The model returns features and logits only. Losses (``vlkit.losses``), tokenisation
(``vlkit.processors``), cross-process gathers and negative sampling live outside it; the pieces here are
what they combine::

    image_embeds = model.encode_image(pixel_values)                      # (B, N, Dv) after ln_vision
    q = model.encode_queries(image_embeds, use_cache=True)               # q.query_output (B, Q, D), q.cache
    image_feats = model.project_image(q.query_output)                    # (B, Q, E), unit norm
    text_feat = model.project_text(model.encode_text(ids, mask))         # (B, E), unit norm, from [CLS]
    sim = model.itc_similarity(image_feats, text_feat)                   # (B, B) cosine, max over queries
    itm = model.itm_logits(image_embeds, ids, mask)                      # (B, 2), class 1 = match
    lm = model.itg_logits(decoder_ids, q.cache, mask)                    # (B, T, V), [DEC] at position 0

Stage 2 (``Blip2Config.lm`` set) adds the bridge to a frozen transformers LLM: ``language_projection``
maps the query outputs to the LLM's embedding width, and the projected queries are a soft visual prompt
in front of the LLM's text (decoder-only LLM) or of its encoder input (encoder-decoder LLM)::

    prefix = model.llm_prefix(pixel_values)                              # (B, Q, D_llm)
    logits = model.lm_logits(prefix, ids, mask)                          # causal: (B, Q + T, V)
    logits = model.lm_logits(prefix, ids, mask, decoder_input_ids=dec)  # seq2seq: (B, T_dec, V)
    new_ids = model.generate(prefix, prompt_ids, prompt_mask, GenerationConfig(num_beams=5))

Tokenisation and the reference's text conventions live in ``vlkit.prompting``; losses in ``vlkit.losses``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.errors import ConfigError
from vlkit.layers.attention import AttentionImpl
from vlkit.layers.norm import LayerNorm
from vlkit.layers.vit import VisionConfig, VisionTransformer
from vlkit.models.qformer import QFormer, QFormerCache, QFormerConfig, QFormerOutput

if TYPE_CHECKING:
    from vlkit.generation import CandidateScores, GenerationConfig
    from vlkit.models.lm import CausalLMDecoder, Seq2SeqDecoder

DEC_TOKEN_ID = 30522  # "[DEC]", appended to bert-base-uncased's vocabulary; replaces [CLS] for ITG

LLMKind = Literal["causal", "seq2seq"]
DTypeName = Literal["float32", "float16", "bfloat16"]
TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# transformers model types of the T5 family, whose gated feed-forward BLIP-2 runs with exact GELU.
T5_FAMILY = ("t5", "mt5", "umt5")
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate")


@dataclass
class LanguageModelConfig:
    """The frozen LLM of a stage-2 BLIP-2 / InstructBLIP model, and how text is framed for it.

    The LLM itself is a transformers model built from ``hf_config`` (``from_config``: nothing is downloaded,
    the weights come from a checkpoint). The text fields record the reference's conventions so that a vlkit
    folder is self-contained; ``vlkit.prompting`` applies them with the LLM's own tokenizer.

    Attributes:
        kind: "causal" (decoder-only: OPT, LLaMA/Vicuna, any ``AutoModelForCausalLM``) or "seq2seq"
            (FlanT5, any ``AutoModelForSeq2SeqLM``).
        hf_config: the LLM's transformers config as a plain dict (``config.json``, with ``model_type``).
        exact_gelu: T5 family with a GELU feed-forward: run it with exact GELU (``dense_act_fn="gelu"``)
            as LAVIS and transformers' BLIP-2 conversion do, instead of FlanT5's tanh approximation.
            Applied to ``hf_config`` on construction; False keeps the config's activation.
        dtype: storage dtype of the frozen LLM when the model is built without an explicit dtype (LAVIS:
            float16 for OPT/Vicuna, bfloat16 for FlanT5); None = like the rest of the model.
        path: the local transformers folder the LLM weights were assembled from (provenance only: building
            a model never reads it, a vlkit folder stores the weights itself).
        prompt: default text prompt for captioning ("" for pretrained models, "a photo of" for the COCO
            caption fine-tunes; its tokens are excluded from the training loss).
        max_txt_len: token limit, specials included, of the text after the queries (caption, prompt,
            instruction; also of the InstructBLIP instruction fed to the Q-Former).
        max_output_txt_len: token limit of responses / decoder targets (InstructBLIP, FlanT5 outputs).
        prompt_truncation: which end of a too-long prompt or instruction is cut ("left" for InstructBLIP).
        add_bos: the tokenizer starts every text with its bos token (OPT: ``</s>``; Vicuna: ``</s>`` too,
            as InstructBLIP overrides LLaMA's bos).
        add_eos: the tokenizer ends every text with its eos token (T5).
        end_of_text: how a caption/response ends in training and generation: "newline" appends "\\n",
            whose token id is the generation eos (OPT); "eos" ends with the tokenizer's eos token (appended
            as text unless the tokenizer adds it itself).
        bos_placeholder: generation's repetition penalty sees ``hf_config``'s ``bos_token_id`` before the first
            new token, as in LAVIS InstructBLIP-Vicuna (transformers 4.2x put a bos placeholder there).
        zero_id_as_eos: replace generated id 0 by the eos id before decoding (LAVIS InstructBLIP-Vicuna).
    """

    kind: LLMKind
    hf_config: dict[str, Any]
    exact_gelu: bool = True
    dtype: DTypeName | None = None
    path: str | None = None
    prompt: str = ""
    max_txt_len: int = 32
    max_output_txt_len: int = 256
    prompt_truncation: Literal["left", "right"] = "right"
    add_bos: bool = False
    add_eos: bool = False
    end_of_text: Literal["eos", "newline"] = "eos"
    bos_placeholder: bool = False
    zero_id_as_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.hf_config, dict) or not isinstance(self.hf_config.get("model_type"), str):
            raise ConfigError("lm.hf_config must be a transformers config dict with a 'model_type'")
        self.hf_config = dict(self.hf_config)
        encoder_decoder = self.hf_config.get("is_encoder_decoder")
        if encoder_decoder is not None and bool(encoder_decoder) != (self.kind == "seq2seq"):
            raise ConfigError(
                f"lm.kind={self.kind!r} but lm.hf_config ({self.hf_config['model_type']}) has "
                f"is_encoder_decoder={encoder_decoder}"
            )
        if self.max_txt_len <= 0 or self.max_output_txt_len <= 0:
            raise ConfigError("lm.max_txt_len and lm.max_output_txt_len must be positive")
        if self.exact_gelu and self.is_t5_gelu(self.hf_config):
            self.hf_config["dense_act_fn"] = "gelu"

    @staticmethod
    def is_t5_gelu(hf_config: dict[str, Any]) -> bool:
        """Whether ``hf_config`` is a T5-family config whose feed-forward uses a GELU."""
        if hf_config.get("model_type") not in T5_FAMILY:
            return False
        act = str(hf_config.get("feed_forward_proj", "relu")).split("-")[-1]
        return act.startswith("gelu") or hf_config.get("dense_act_fn") in _TANH_GELUS

    def transformers_config(self) -> Any:
        """The LLM's transformers ``PretrainedConfig``."""
        from transformers import AutoConfig  # deferred: transformers is slow to import

        data = dict(self.hf_config)
        model_type = data.pop("model_type")
        try:
            return AutoConfig.for_model(model_type, **data)
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"lm.hf_config: transformers cannot build a {model_type!r} config ({err})") from err


@dataclass
class Blip2Config:
    """A BLIP-2 model.

    Attributes:
        vision: the ViT.
        qformer: the Q-Former; ``qformer.encoder_width`` must equal ``vision.width``.
        num_query_tokens: number of learned queries (32).
        embed_dim: width of the contrastive space of ``vision_proj``/``text_proj`` (256).
        ln_vision_eps: eps of ``ln_vision``: 1e-5 in LAVIS, 1e-6 in transformers (it reuses the ViT eps).
        itc_itm_heads: has ``vision_proj``, ``text_proj``, ``itm_head`` and ``temp`` (stage 1).
        lm: the stage-2 LLM and its projection (None: a stage-1 model).

    ``instruction_aware`` (a class attribute, True for ``InstructBlipConfig``) says whether prompts also
    enter the Q-Former.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    num_query_tokens: int = 32
    embed_dim: int = 256
    ln_vision_eps: float = 1e-5
    itc_itm_heads: bool = True
    lm: LanguageModelConfig | None = None

    #: Whether the prompt/instruction also enters the Q-Former (InstructBLIP); BLIP-2 runs queries alone.
    instruction_aware = False

    def __post_init__(self) -> None:
        if self.qformer.encoder_width != self.vision.width:
            raise ConfigError(
                f"qformer.encoder_width ({self.qformer.encoder_width}) must equal vision.width ({self.vision.width})"
            )
        if self.num_query_tokens <= 0 or self.embed_dim <= 0:
            raise ConfigError("num_query_tokens and embed_dim must be positive")
        if self.itc_itm_heads and not self.qformer.text_input:
            raise ConfigError("itc_itm_heads=True needs a Q-Former with text input (qformer.text_input=True)")


@dataclass
class Blip2Output:
    """Image-side and text-side features of one batch (what the stage-1 objectives start from)."""

    image_embeds: Tensor  # (B, N, Dv) ViT tokens after ln_vision
    query_output: Tensor  # (B, Q, D) query outputs of the unimodal (queries-only) pass
    image_feats: Tensor  # (B, Q, E) L2-normalised vision_proj(query_output)
    text_output: Tensor | None = None  # (B, T, D) text-only pass
    text_feat: Tensor | None = None  # (B, E) L2-normalised text_proj of the [CLS] output
    query_cache: QFormerCache | None = None  # self-attention K/V of the query pass (for ITG)


@dataclass
class LMOutput:
    """Logits of the Q-Former MLM head for the new text positions, and the updated cache."""

    logits: Tensor  # (B, T, V)
    cache: QFormerCache | None = None


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create module parameters on the meta device while buffers are created for real.

    A transformers LLM has non-persistent buffers that no checkpoint stores (LLaMA's rotary frequencies),
    computed in its constructor. Built this way they keep their values, while the parameters cost nothing
    until a checkpoint's tensors are assigned to them (``load_state_dict(assign=True)``).
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def cast_parameters(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating-point parameters (in place, ties kept) but not buffers: a frozen LLM stored in fp16 keeps
    e.g. LLaMA's rotary frequencies in fp32, as transformers does."""
    module._apply(lambda t: t.to(dtype) if isinstance(t, nn.Parameter) and t.is_floating_point() else t)


def build_llm(lm: LanguageModelConfig, *, device: torch.device | str | None = None) -> nn.Module:
    """The transformers LLM of ``lm``, randomly initialised from its config (nothing is downloaded).

    Args:
        lm: the LLM config.
        device: "meta" creates parameters without storage (buffers stay real, see ``_parameters_on_meta``).

    Raises:
        ConfigError: if transformers has no causal / seq2seq LM class for the config.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM  # deferred: slow import

    auto = AutoModelForCausalLM if lm.kind == "causal" else AutoModelForSeq2SeqLM
    hf_config = lm.transformers_config()
    on_meta = device is not None and torch.device(device).type == "meta"
    context = _parameters_on_meta() if on_meta else torch.device(device) if device is not None else nullcontext()
    try:
        with context:
            return auto.from_config(hf_config)
    except ValueError as err:
        raise ConfigError(f"lm: transformers has no {auto.__name__} for {lm.hf_config['model_type']!r}: {err}") from err


class Blip2(nn.Module):
    """BLIP-2 vision encoder + Q-Former with the stage-1 heads.

    Args:
        config: the architecture.
        device: where to create the parameters (``"meta"`` builds a shape-only model instantly).
        dtype: parameter dtype (default: torch's default dtype).
    """

    def __init__(
        self, config: Blip2Config, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.config = config
        d = config.qformer.hidden_size
        with torch.device(device) if device is not None else nullcontext():
            self.vision = VisionTransformer(config.vision)
            self.ln_vision = LayerNorm(config.vision.width, eps=config.ln_vision_eps)
            self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, d))
            self.qformer = QFormer(config.qformer)
            if config.itc_itm_heads:
                self.vision_proj = nn.Linear(d, config.embed_dim)
                self.text_proj = nn.Linear(d, config.embed_dim)
                self.itm_head = nn.Linear(d, 2)
                self.temp = nn.Parameter(torch.tensor(0.07))
            else:
                self.vision_proj = self.text_proj = self.itm_head = None
                self.temp = None
        self.llm: nn.Module | None = None
        self.language_projection: nn.Linear | None = None
        if config.lm is not None:
            self.llm = build_llm(config.lm, device=device)
            width = self.llm.get_input_embeddings().embedding_dim
            with torch.device(device) if device is not None else nullcontext():
                self.language_projection = nn.Linear(d, width)
        with torch.device(device) if device is not None else nullcontext():
            self._init_own_weights()
        if dtype is not None:
            self.to(dtype)
        elif config.lm is not None and config.lm.dtype is not None:
            cast_parameters(self.llm, TORCH_DTYPES[config.lm.dtype])
        self._vision_frozen = False
        self._llm_frozen = False

    @torch.no_grad()
    def _init_own_weights(self) -> None:
        nn.init.normal_(self.query_tokens, std=0.02)
        for head in (self.vision_proj, self.text_proj, self.itm_head):
            if head is not None:
                nn.init.normal_(head.weight, std=0.02)
                nn.init.zeros_(head.bias)

    # ----------------------------------------------------------------------------------- training state
    def freeze_vision(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the ViT: no gradients, and kept in eval mode by ``train()``.

        ``ln_vision`` is not part of the frozen ViT: it stays trainable, as in every reference stage.
        """
        self._vision_frozen = frozen
        self.vision.requires_grad_(not frozen)
        self.vision.train(False if frozen else self.training)

    @property
    def vision_frozen(self) -> bool:
        return self._vision_frozen

    def freeze_llm(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the LLM: no gradients, kept in eval mode. The projection stays trainable."""
        llm = self._llm()
        self._llm_frozen = frozen
        llm.requires_grad_(not frozen)
        llm.train(False if frozen else self.training)

    @property
    def llm_frozen(self) -> bool:
        return self._llm_frozen

    def train(self, mode: bool = True) -> Blip2:
        super().train(mode)
        if self._vision_frozen:
            self.vision.eval()
        if self._llm_frozen:
            self.llm.eval()
        return self

    def set_attn_impl(self, impl: AttentionImpl) -> None:
        """Switch every attention layer to "sdpa" (fast) or "eager" (reference)."""
        for module in self.modules():
            if hasattr(module, "attn_impl"):
                module.attn_impl = impl
        self.config.vision.attn_impl = impl
        self.config.qformer.attn_impl = impl

    # ----------------------------------------------------------------------------------- image side
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """ViT + ``ln_vision``: (B, 3, S, S) -> image_embeds (B, N, Dv), the Q-Former's cross-attention input."""
        return self.ln_vision(self.vision(pixel_values))

    def encode_queries(
        self, image_embeds: Tensor, *, image_mask: Tensor | None = None, use_cache: bool = False
    ) -> QFormerOutput:
        """Queries-only (unimodal) Q-Former pass over ``image_embeds`` (B, N, Dv).

        Returns:
            QFormerOutput: ``query_output`` (B, Q, D); with ``use_cache`` also the self-attention K/V of
            every layer, which ITG and Q-Former captioning attend to.
        """
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(queries, image_embeds=image_embeds, image_mask=image_mask, use_cache=use_cache)

    def project_image(self, query_output: Tensor) -> Tensor:
        """L2-normalised ``vision_proj`` of every query output: (B, Q, D) -> image_feats (B, Q, E)."""
        return F.normalize(self._head("vision_proj")(query_output), dim=-1)

    # ----------------------------------------------------------------------------------- text side
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Text-only (unimodal) Q-Former pass: (B, T) ids -> text_output (B, T, D)."""
        return self.qformer(input_ids=input_ids, attention_mask=attention_mask).hidden_states

    def project_text(self, text_output: Tensor) -> Tensor:
        """L2-normalised ``text_proj`` of the [CLS] (position 0) output: (B, T, D) -> text_feat (B, E)."""
        return F.normalize(self._head("text_proj")(text_output[:, 0]), dim=-1)

    # ----------------------------------------------------------------------------------- multimodal
    def encode_multimodal(
        self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> Tensor:
        """Bi-directional queries+text pass: query outputs (B, Q, D) (LAVIS's multimodal_embeds).

        Args:
            image_embeds: (B, N, Dv).
            input_ids: (B, T).
            attention_mask: (B, T) text padding mask.
        """
        queries = self.query_tokens.expand(input_ids.shape[0], -1, -1)
        out = self.qformer(queries, input_ids, attention_mask, image_embeds)
        return out.query_output

    def itm_logits(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Image-text matching logits (B, 2): ``itm_head`` of each query output, averaged over queries.

        Class 1 means "match". Retrieval re-ranking uses the raw class-1 logit.
        """
        return self._head("itm_head")(self.encode_multimodal(image_embeds, input_ids, attention_mask)).mean(dim=1)

    def itg_logits(
        self,
        input_ids: Tensor,
        query_cache: QFormerCache,
        attention_mask: Tensor | None = None,
        *,
        use_cache: bool = False,
    ) -> LMOutput:
        """Image-grounded text generation logits: causal text over the cached query keys/values.

        Args:
            input_ids: (B, T) decoder ids, ``[DEC]`` (``DEC_TOKEN_ID``) at position 0 of the caption.
            query_cache: cache of ``encode_queries(..., use_cache=True)`` (or of an earlier decode step).
            attention_mask: (B, query_cache.text_len + T) text padding mask, or None.
            use_cache: also return the cache extended by these tokens (token-by-token decoding).

        Returns:
            LMOutput with logits (B, T, V): position t predicts token t + 1.
        """
        out = self.qformer(
            input_ids=input_ids, attention_mask=attention_mask, causal=True, past=query_cache, use_cache=use_cache
        )
        return LMOutput(self.qformer.lm_logits(out.hidden_states), out.cache)

    # ----------------------------------------------------------------------------------- contrastive
    @staticmethod
    def itc_similarity(image_feats: Tensor, text_feats: Tensor) -> Tensor:
        """Cosine image-text similarity, max over queries (no temperature).

        Args:
            image_feats: (Bi, Q, E) unit-norm query features.
            text_feats: (Bt, E) unit-norm text features.

        Returns:
            (Bi, Bt)
        """
        bi, q, e = image_feats.shape
        sim = image_feats.reshape(bi * q, e) @ text_feats.to(image_feats.dtype).t()  # (Bi*Q, Bt)
        return sim.view(bi, q, -1).amax(dim=1)

    def itc_logits(self, image_feats: Tensor, text_feats: Tensor) -> tuple[Tensor, Tensor]:
        """Contrastive logits: similarity / ``temp`` (learnable, not clamped).

        Returns:
            (logits_i2t (Bi, Bt), logits_t2i (Bt, Bi))
        """
        sim = self.itc_similarity(image_feats, text_feats) / self._head("temp")
        return sim, sim.t()

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        use_cache: bool = False,
    ) -> Blip2Output:
        """Image-side features and (with text) text-side features of a batch.

        Args:
            pixel_values: (B, 3, S, S).
            input_ids, attention_mask: (B, T) tokenised captions, or None for images only.
            use_cache: keep the query pass's self-attention K/V (needed for ITG).
        """
        image_embeds = self.encode_image(pixel_values)
        q = self.encode_queries(image_embeds, use_cache=use_cache)
        out = Blip2Output(image_embeds, q.query_output, self.project_image(q.query_output), query_cache=q.cache)
        if input_ids is not None:
            out.text_output = self.encode_text(input_ids, attention_mask)
            out.text_feat = self.project_text(out.text_output)
        return out

    # ----------------------------------------------------------------------------------- LLM bridge (stage 2)
    @property
    def llm_kind(self) -> LLMKind:
        """ "causal" or "seq2seq" (raises for a stage-1 model)."""
        self._llm()
        return self.config.lm.kind

    def llm_prefix(
        self,
        pixel_values: Tensor | None = None,
        *,
        image_embeds: Tensor | None = None,
        qformer_ids: Tensor | None = None,
        qformer_mask: Tensor | None = None,
    ) -> Tensor:
        """The visual soft prompt: projected query outputs (B, Q, D_llm).

        Args:
            pixel_values: (B, 3, S, S) images, or None when ``image_embeds`` are given.
            image_embeds: (B, N, Dv) output of ``encode_image`` (to reuse across prompts).
            qformer_ids, qformer_mask: (B, T) instruction tokens that enter the Q-Former with the queries
                (bi-directional, InstructBLIP); None runs the queries alone (BLIP-2).
        """
        self._llm()  # a stage-1 model has no projection: say so clearly
        projection = self.language_projection
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("llm_prefix needs pixel_values or image_embeds")
            image_embeds = self.encode_image(pixel_values)
        if qformer_ids is not None:
            query_output = self.encode_multimodal(image_embeds, qformer_ids, qformer_mask)
        else:
            query_output = self.encode_queries(image_embeds).query_output
        return projection(query_output.to(projection.weight.dtype))

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """The LLM's input embeddings of (B, T) ids: (B, T, D_llm)."""
        return self._llm().get_input_embeddings()(input_ids)

    def llm_inputs(
        self, prefix: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``[prefix; embedded text]`` and its mask ``[ones; attention_mask]``.

        This is the decoder-only LLM's input (or the encoder-decoder LLM's encoder input). With left-padded
        prompts the padding sits between the queries and the text, as in LAVIS; position ids follow from the
        mask, so every row computes what it would alone.

        Args:
            prefix: (B, Q, D_llm) from ``llm_prefix``.
            input_ids: (B, T) LLM token ids, or None for the prefix alone.
            attention_mask: (B, T) 1 = token, 0 = padding; all ones when None.

        Returns:
            inputs_embeds (B, Q + T, D_llm) in the LLM's dtype, attention_mask (B, Q + T) long.
        """
        embedding = self._llm().get_input_embeddings()
        prefix = prefix.to(embedding.weight.dtype)
        ones = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        if input_ids is None:
            return prefix, ones
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape or input_ids.shape[0] != prefix.shape[0]:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and prefix "
                f"{tuple(prefix.shape)} must agree on (B, T)"
            )
        embeds = torch.cat([prefix, embedding(input_ids)], dim=1)
        return embeds, torch.cat([ones, attention_mask.to(ones.device, torch.long)], dim=1)

    def lm_logits(
        self,
        prefix: Tensor,
        input_ids: Tensor | None,
        attention_mask: Tensor | None = None,
        *,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """LLM logits with the visual prefix.

        Args:
            prefix: (B, Q, D_llm) from ``llm_prefix``.
            input_ids, attention_mask: (B, T) text after the queries (decoder-only: caption/prompt;
                encoder-decoder: the encoder's text).
            decoder_input_ids, decoder_attention_mask: (B, T_dec) encoder-decoder LLM only (the labels shifted
                right behind the decoder start token: ``vlkit.prompting.shift_right``).

        Returns:
            Decoder-only: (B, Q + T, V) over the whole sequence, query positions included (pair them with
            ``losses.causal_lm_targets``). Encoder-decoder: (B, T_dec, V) (pair with ``losses.seq2seq_targets``).
        """
        llm = self._llm()
        embeds, mask = self.llm_inputs(prefix, input_ids, attention_mask)
        if self.config.lm.kind == "causal":
            if decoder_input_ids is not None:
                raise ValueError("decoder_input_ids only apply to an encoder-decoder LLM")
            return llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False, return_dict=True).logits
        if decoder_input_ids is None:
            raise ValueError("an encoder-decoder LLM needs decoder_input_ids (see vlkit.prompting.shift_right)")
        out = llm(
            inputs_embeds=embeds,
            attention_mask=mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            use_cache=False,
            return_dict=True,
        )
        return out.logits

    def decoder(self, *, use_cache: bool = True) -> CausalLMDecoder | Seq2SeqDecoder:
        """The LLM as a ``vlkit.generation.Decoder`` (fed with ``llm_inputs``).

        Args:
            use_cache: False selects the reference path that recomputes every step without a KV cache.
        """
        from vlkit.models.lm import CausalLMDecoder, Seq2SeqDecoder  # deferred: imports transformers

        llm = self._llm()
        if self.config.lm.kind == "causal":
            return CausalLMDecoder(llm, use_cache=use_cache)
        return Seq2SeqDecoder(llm, use_cache=use_cache)

    @torch.no_grad()
    def generate(
        self,
        prefix: Tensor,
        input_ids: Tensor | None,
        attention_mask: Tensor | None,
        config: GenerationConfig,
        *,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Generate continuations of ``[prefix; prompt]`` (greedy, sampling or beam search per ``config``).

        Args:
            prefix: (B, Q, D_llm) from ``llm_prefix``.
            input_ids, attention_mask: (B, T) prompt tokens, left-padded for a decoder-only LLM (right-padded
                is fine for an encoder-decoder one); None for no prompt.
            config: decoding settings (eos, pad, beams, penalties; see ``vlkit.prompting`` for the
                reference's defaults).
            use_cache: False = reference path without KV cache.
            generator: random source for sampling.

        Returns:
            (B * num_return_sequences, T_new) new token ids only, padded with ``config.pad_token_id``.
        """
        from vlkit.generation import generate

        embeds, mask = self.llm_inputs(prefix, input_ids, attention_mask)
        return generate(self.decoder(use_cache=use_cache), config, embeds, mask, generator=generator)

    @torch.no_grad()
    def score_candidates(
        self,
        prefix: Tensor,
        input_ids: Tensor | None,
        attention_mask: Tensor | None,
        candidate_ids: Tensor,
        candidate_mask: Tensor | None = None,
        *,
        chunk_size: int | None = None,
    ) -> CandidateScores:
        """Negative log-likelihood of candidate continuations after ``[prefix; prompt]`` (answer ranking).

        Args:
            prefix: (B, Q, D_llm).
            input_ids, attention_mask: (B, T) prompt (left-padded for a decoder-only LLM), or None.
            candidate_ids, candidate_mask: (N, Tc) or (B, N, Tc) right-padded candidate tokens.
            chunk_size: candidates per forward pass.

        Returns:
            ``CandidateScores`` with (B, N) summed and mean token cross-entropies; rank with ``argsort``.
        """
        from vlkit.generation import score_candidates

        embeds, mask = self.llm_inputs(prefix, input_ids, attention_mask)
        return score_candidates(self.decoder(), embeds, mask, candidate_ids, candidate_mask, chunk_size=chunk_size)

    def tied_parameters(self) -> dict[str, str]:
        """Parameters that are the same tensor as another one, ``{alias: original}`` (the LLM's output
        matrix tied to its input embeddings). A vlkit folder stores only the original."""
        first: dict[int, str] = {}
        aliases: dict[str, str] = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            key = id(param)
            if key in first:
                aliases[name] = first[key]
            else:
                first[key] = name
        return aliases

    def tie_parameters(self, aliases: dict[str, str]) -> None:
        """Make every ``alias`` the same parameter as its ``original`` again (after assigning a state dict)."""
        for alias, original in aliases.items():
            owner_name, _, attr = alias.rpartition(".")
            owner = self.get_submodule(owner_name)
            setattr(owner, attr, self.get_parameter(original))

    def _llm(self) -> nn.Module:
        if self.llm is None:
            raise ConfigError("this BLIP-2 model has no LLM (config.lm is None: a stage-1 model)")
        return self.llm

    def _head(self, name: str) -> Any:
        module = getattr(self, name)
        if module is None:
            raise ConfigError(f"this BLIP-2 model has no {name} (itc_itm_heads=False)")
        return module
