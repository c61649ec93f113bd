"""Text for the LLM of BLIP-2 stage 2 and InstructBLIP: tokenisation conventions, training batches,
generation settings, and the caption / VQA / ranking helpers built on them.

The LLM's own tokenizer (transformers ``AutoTokenizer``, loaded from local files) turns text into content
tokens; :class:`LLMTokenizer` frames, truncates and pads them the way the reference does, driven by the
model's ``LanguageModelConfig``:

* OPT: ``</s>`` (bos, id 2) starts every text; captions end with ``"\\n"``, whose id is also the generation
  eos; a prompt's length for the loss mask counts its bos.
* FlanT5: every text ends with ``</s>``; the encoder reads ``[queries; prompt </s>]``, the decoder the target.
* Vicuna (InstructBLIP): bos = eos = unk = ``</s>`` and a new ``[PAD]`` token (the LLM's vocabulary grows by
  one); instructions are cut on the left at 128 tokens, responses + ``"</s>"`` on the right at 256.

Truncation keeps the bos/eos frame and cuts content only, as transformers' tokenizers do. Framing is
explicit (``add_bos``/``add_eos``) rather than left to the tokenizer's post-processor, so a tokenizer whose
special tokens were overridden (Vicuna) still frames exactly as the reference's slow tokenizer.

:class:`LLMProcessor` adds the Q-Former tokenizer (InstructBLIP) and builds everything a task needs:
``training_batch`` (ids, masks and loss targets), ``prompts`` (generation/ranking inputs), ``candidates``,
``generation_config`` (the reference's decoding defaults per task) and ``decode``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from vlkit.errors import ConfigError, DataError, VlkitError
from vlkit.generation import GenerationConfig
from vlkit.losses import causal_lm_targets, pack_instruction_response, seq2seq_targets
from vlkit.models.blip2 import Blip2, Blip2Config, LanguageModelConfig
from vlkit.processors import QFormerTokenizer, blip_question

LLM_TOKENIZER_DIR = "llm_tokenizer"
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
VQA_PROMPT = "Question: {} Short answer:"
CAPTION_PROMPT = "a photo of"
Task = Literal["caption", "vqa", "instruct"]

__all__ = [
    "CAPTION_PROMPT",
    "LLMProcessor",
    "LLMTokenizer",
    "LMBatch",
    "PromptBatch",
    "VQA_PROMPT",
    "answer",
    "caption",
    "family_conventions",
    "instructblip_vicuna_tokenizer",
    "lm_loss",
    "probe_framing",
    "rank_candidates",
]


# ----------------------------------------------------------------------------------------------------------
# Conventions per LLM family
# ----------------------------------------------------------------------------------------------------------


def probe_framing(tokenizer: Any) -> tuple[bool, bool]:
    """Whether ``tokenizer`` puts a special token first / last when it adds special tokens.

    Compares the ids of a probe text with and without special tokens. Only the position matters: the
    framing then uses the tokenizer's *current* bos/eos ids, as the reference's slow tokenizers do (a fast
    tokenizer whose bos was overridden, like InstructBLIP's Vicuna, may still prepend the old one).
    """
    text = "a b"
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(text)["input_ids"])
    start = full.index(plain[0]) if plain and plain[0] in full else 0
    add_bos = start == 1 and full[1 : 1 + len(plain)] == plain
    add_eos = len(full) == start + len(plain) + 1 and full[start : start + len(plain)] == plain
    return add_bos, add_eos


def family_conventions(hf_config: Mapping[str, Any], *, instruction: bool, tokenizer: Any = None) -> dict[str, Any]:
    """The reference's text conventions for an LLM (``LanguageModelConfig`` keyword arguments).

    Args:
        hf_config: the LLM's transformers config dict (``model_type`` decides the family).
        instruction: InstructBLIP (longer, left-truncated instructions; Vicuna's decoding quirks).
        tokenizer: the LLM's tokenizer, if available: bos/eos framing is probed from it instead of assumed.

    Returns:
        ``add_bos``, ``add_eos``, ``end_of_text``, ``max_txt_len``, ``max_output_txt_len``,
        ``prompt_truncation``, ``bos_placeholder``, ``zero_id_as_eos``.
    """
    model_type = hf_config.get("model_type")
    seq2seq = bool(hf_config.get("is_encoder_decoder", False))
    if tokenizer is not None:
        add_bos, add_eos = probe_framing(tokenizer)
    else:  # what the family's tokenizer does: OPT/LLaMA prepend a bos, T5 appends </s>
        add_bos, add_eos = not seq2seq, seq2seq
    out: dict[str, Any] = {
        "add_bos": add_bos,
        "add_eos": add_eos,
        "end_of_text": "newline" if model_type == "opt" else "eos",
        "max_txt_len": 128 if instruction else 32,
        "max_output_txt_len": 256 if instruction else 32,
        "prompt_truncation": "left" if instruction else "right",
    }
    if instruction and not seq2seq:
        # LAVIS InstructBLIP-Vicuna: generation's bos placeholder meets repetition_penalty=1.5, and id 0
        # (what padding became) is mapped to eos before decoding.
        out["bos_placeholder"] = hf_config.get("bos_token_id") is not None
        out["zero_id_as_eos"] = True
    return out


def instructblip_vicuna_tokenizer(tokenizer: Any) -> Any:
    """Apply InstructBLIP's overrides to a LLaMA/Vicuna tokenizer (in place): a new ``[PAD]`` token (the
    LLM's vocabulary must grow to ``len(tokenizer)``) and bos = eos = unk = ``"</s>"``."""
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.add_special_tokens({"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>"})
    return tokenizer


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """A transformers tokenizer from a local folder (``AutoTokenizer``, never downloads)."""
    from transformers import AutoTokenizer  # deferred: slow import

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers raises many kinds; name the folder
        raise VlkitError(f"{folder}: cannot load a tokenizer ({type(err).__name__}: {err})") from err


# ----------------------------------------------------------------------------------------------------------
# The LLM tokenizer with the model's framing
# ----------------------------------------------------------------------------------------------------------


class LLMTokenizer:
    """A transformers tokenizer used with a model's text conventions.

    Args:
        tokenizer: the LLM's tokenizer (``PreTrainedTokenizerBase``).
        lm: the model's ``LanguageModelConfig``.
    """

    def __init__(self, tokenizer: Any, lm: LanguageModelConfig) -> None:
        self.tokenizer = tokenizer
        self.lm = lm
        if lm.add_bos and tokenizer.bos_token_id is None:
            raise ConfigError("lm.add_bos is set but the tokenizer has no bos token")
        if (lm.add_eos or lm.end_of_text == "eos") and tokenizer.eos_token_id is None:
            raise ConfigError("the model's text ends with eos but the tokenizer has no eos token")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, lm: LanguageModelConfig) -> LLMTokenizer:
        return cls(load_tokenizer(folder), lm)

    def __len__(self) -> int:
        return len(self.tokenizer)

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        """The padding id (the tokenizer's pad; its eos, then 0, when it has none)."""
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    @property
    def end_of_text_id(self) -> int:
        """Generation eos: the id of ``"\\n"`` for ``end_of_text="newline"`` (OPT), else the eos id."""
        if self.lm.end_of_text == "newline":
            ids = self.tokenizer("\n", add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ConfigError(f'the tokenizer splits "\\n" into {len(ids)} tokens; it cannot end captions')
            return int(ids[0])
        return int(self.tokenizer.eos_token_id)

    @property
    def target_suffix(self) -> str:
        """Text appended to every caption/response in training: "\\n", or the eos token unless framing adds it."""
        if self.lm.end_of_text == "newline":
            return "\n"
        return "" if self.lm.add_eos else str(self.tokenizer.eos_token)

    def content_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text without any special token added."""
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def encode(
        self,
        texts: str | Sequence[str],
        *,
        max_length: int | None = None,
        truncation_side: Literal["left", "right"] = "right",
        padding_side: Literal["left", "right"] = "right",
        suffix: str = "",
        frame: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Tokenise a batch: ``[bos] content(text + suffix) [eos]``, padded to the longest.

        Args:
            texts: one string or a list.
            max_length: length limit including bos/eos; content beyond it is cut on ``truncation_side``.
            truncation_side: "right" keeps the start, "left" the end.
            padding_side: where the pad ids go ("left" for decoder-only generation).
            suffix: appended to every text before tokenising (``target_suffix`` for training targets).
            frame: add bos/eos per the model's conventions.

        Returns:
            ``(input_ids, attention_mask)``, both (B, L) int64.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise DataError("cannot tokenise an empty batch")
        head = [int(self.bos_token_id)] if frame and self.lm.add_bos else []
        tail = [int(self.eos_token_id)] if frame and self.lm.add_eos else []
        rows = []
        for ids in self.content_ids([t + suffix for t in texts]):
            if max_length is not None:
                budget = max(0, max_length - len(head) - len(tail))
                if len(ids) > budget:
                    ids = ids[:budget] if truncation_side == "right" else ids[len(ids) - budget :]
            rows.append(head + ids + tail)
        return pad_rows(rows, self.pad_token_id, padding_side)

    def prompt_length(self, prompt: str) -> int:
        """Tokens of ``prompt`` alone, framing included (the loss mask length; 4 for "a photo of" with OPT)."""
        ids, _ = self.encode([prompt])
        return ids.shape[1]

    def decode(self, ids: Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Generated ids (B, T) -> stripped strings, special tokens skipped (id 0 -> eos first for Vicuna)."""
        if isinstance(ids, Tensor):
            ids = ids.clone()
            if self.lm.zero_id_as_eos:
                ids[ids == 0] = int(self.eos_token_id)
            rows = ids.tolist()
        else:
            rows = [[int(self.eos_token_id) if self.lm.zero_id_as_eos and i == 0 else i for i in r] for r in ids]
        return [text.strip() for text in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]

    def save(self, folder: str | os.PathLike) -> None:
        """Write the tokenizer files to ``folder``."""
        self.tokenizer.save_pretrained(str(folder))


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: Literal["left", "right"]) -> tuple[Tensor, Tensor]:
    """Pad id lists to one (B, L) tensor and its mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LMBatch:
    """Everything one LM training step needs besides the images (LAVIS's exact inputs and targets).

    Attributes:
        input_ids, attention_mask: (B, T) text after the queries: decoder-only: caption or packed
            instruction + response; encoder-decoder: the encoder text.
        targets: decoder-only: (B, Q + T) labels over the whole LLM input (-100 on queries, padding and
            prompt/instruction); encoder-decoder: (B, T_out) decoder labels (-100 on padding).
        decoder_input_ids, decoder_attention_mask: (B, T_out) encoder-decoder only.
        qformer_ids, qformer_mask: (B, T_q) instruction for the Q-Former (InstructBLIP only).
    """

    input_ids: Tensor
    attention_mask: Tensor
    targets: Tensor
    decoder_input_ids: Tensor | None = None
    decoder_attention_mask: Tensor | None = None
    qformer_ids: Tensor | None = None
    qformer_mask: Tensor | None = None

    def to(self, device: torch.device | str) -> LMBatch:
        """The batch on ``device``."""
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(self).items()}
        return LMBatch(**moved)


@dataclass
class PromptBatch:
    """Tokenised prompts for generation or candidate ranking.

    Attributes:
        input_ids, attention_mask: (B, T) LLM prompt tokens; left-padded for a decoder-only LLM.
        qformer_ids, qformer_mask: (B, T_q) the prompt for the Q-Former (InstructBLIP), else None.
    """

    input_ids: Tensor
    attention_mask: Tensor
    qformer_ids: Tensor | None = None
    qformer_mask: Tensor | None = None

    def to(self, device: torch.device | str) -> PromptBatch:
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(self).items()}
        return PromptBatch(**moved)


class LLMProcessor:
    """The text side of a stage-2 BLIP-2 / InstructBLIP model.

    Args:
        config: the model's config (``lm`` must be set).
        llm_tokenizer: the LLM's tokenizer (a transformers tokenizer or an ``LLMTokenizer``).
        qformer_tokenizer: the Q-Former tokenizer; required when ``config.instruction_aware``.
    """

    def __init__(self, config: Blip2Config, llm_tokenizer: Any, qformer_tokenizer: QFormerTokenizer | None = None):
        if config.lm is None:
            raise ConfigError("LLMProcessor needs a model config with an LLM (config.lm)")
        if config.instruction_aware and qformer_tokenizer is None:
            raise ConfigError("an instruction-aware model (InstructBLIP) needs the Q-Former tokenizer")
        self.config = config
        self.lm = config.lm
        self.llm = llm_tokenizer if isinstance(llm_tokenizer, LLMTokenizer) else LLMTokenizer(llm_tokenizer, config.lm)
        self.qformer = qformer_tokenizer
        if self.qformer is not None and config.instruction_aware:
            self.qformer.truncation_side = self.lm.prompt_truncation

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> LLMProcessor:
        """The processor of a vlkit folder (``config.yaml``, ``llm_tokenizer/``, ``qformer_tokenizer/``)."""
        from vlkit.checkpoints.folder import read_config

        path = Path(path)
        _, config = read_config(path)
        if config.lm is None:
            raise ConfigError(f"{path}: a stage-1 model has no LLM tokenizer")
        llm_dir = path / LLM_TOKENIZER_DIR
        if not llm_dir.is_dir():
            raise ConfigError(f"{path}: no {LLM_TOKENIZER_DIR}/ folder (convert with the LLM's tokenizer)")
        qformer = None
        if (path / QFORMER_TOKENIZER_DIR).is_dir():
            qformer = QFormerTokenizer(path / QFORMER_TOKENIZER_DIR)
        return cls(config, LLMTokenizer.from_folder(llm_dir, config.lm), qformer)

    @property
    def causal(self) -> bool:
        return self.lm.kind == "causal"

    @property
    def num_query_tokens(self) -> int:
        return self.config.num_query_tokens

    def _qformer_tokens(self, texts: Sequence[str]) -> tuple[Tensor | None, Tensor | None]:
        if not self.config.instruction_aware:
            return None, None
        return self.qformer(list(texts), max_length=self.lm.max_txt_len)

    # ------------------------------------------------------------------------------------------ training
    def training_batch(self, text_input: Sequence[str], text_output: Sequence[str] | None = None) -> LMBatch:
        """LAVIS's LM-loss inputs and targets for a batch.

        * decoder-only, ``text_output`` None (BLIP-2 OPT stage 2 / caption fine-tuning): the caption is
          ``text_input`` + end-of-text ("\\n" for OPT), right-padded, cut at ``max_txt_len``; padding and,
          when the model has a prompt, the prompt's first ``prompt_length`` tokens (bos included) are not
          targets; with no prompt the bos stays a target (the reference's quirk).
        * decoder-only with ``text_output`` (InstructBLIP-Vicuna): instruction cut on ``prompt_truncation``
          at ``max_txt_len``, response + "</s>" cut on the right at ``max_output_txt_len``, packed so real
          tokens are contiguous; only response tokens are targets.
        * encoder-decoder (FlanT5): encoder text ``text_input`` + </s>, decoder labels ``text_output`` + </s>;
          with ``text_output`` None the captions are the labels and the model's prompt is the encoder text.

        Args:
            text_input: captions, prompts or instructions (already cleaned by the text processor).
            text_output: responses / target texts, one per input.
        """
        text_input = list(text_input)
        if text_output is not None and len(text_output) != len(text_input):
            raise DataError(f"{len(text_input)} text_input but {len(text_output)} text_output")
        q = self.num_query_tokens
        lm, tok = self.lm, self.llm
        qformer_ids, qformer_mask = self._qformer_tokens(text_input)
        if not self.causal:
            if text_output is None:
                text_input, text_output = [lm.prompt] * len(text_input), text_input
            ids, mask = tok.encode(text_input, max_length=lm.max_txt_len, truncation_side=lm.prompt_truncation)
            out_ids, out_mask = tok.encode(
                text_output, max_length=lm.max_output_txt_len, suffix=tok.target_suffix, truncation_side="right"
            )
            labels = seq2seq_targets(out_ids, pad_id=tok.pad_token_id)
            shifted = shift_right(labels, self._decoder_start(), tok.pad_token_id)
            return LMBatch(ids, mask, labels, shifted, out_mask, qformer_ids, qformer_mask)
        if text_output is None:
            ids, mask = tok.encode(text_input, max_length=lm.max_txt_len, suffix=tok.target_suffix)
            prompt_len = tok.prompt_length(lm.prompt) if lm.prompt else 0
            targets = causal_lm_targets(ids, num_query_tokens=q, pad_id=tok.pad_token_id, prompt_len=prompt_len)
            return LMBatch(ids, mask, targets, qformer_ids=qformer_ids, qformer_mask=qformer_mask)
        instr_ids, instr_mask = tok.encode(text_input, max_length=lm.max_txt_len, truncation_side=lm.prompt_truncation)
        resp_ids, resp_mask = tok.encode(text_output, max_length=lm.max_output_txt_len, suffix=tok.target_suffix)
        if not lm.add_bos:  # packing drops each response's leading bos: give it a stand-in to drop
            resp_ids = torch.cat([torch.full_like(resp_ids[:, :1], tok.pad_token_id), resp_ids], dim=1)
            resp_mask = torch.cat([torch.ones_like(resp_mask[:, :1]), resp_mask], dim=1)
        packed = pack_instruction_response(
            instr_ids, instr_mask, resp_ids, resp_mask, tok.pad_token_id, num_query_tokens=q
        )
        return LMBatch(packed.input_ids, packed.attention_mask, packed.targets, None, None, qformer_ids, qformer_mask)

    def _decoder_start(self) -> int:
        start = self.lm.hf_config.get("decoder_start_token_id")
        return int(start) if start is not None else self.llm.pad_token_id

    # ------------------------------------------------------------------------------------------ inference
    def prompts(self, prompts: str | Sequence[str], batch_size: int | None = None) -> PromptBatch:
        """Tokenise generation / ranking prompts.

        Decoder-only: left padding (the queries then sit before the padding, as in LAVIS); BLIP-2 cuts prompts
        at ``max_txt_len`` as LAVIS's OPT does, InstructBLIP and FlanT5 do not cut the LLM prompt. The
        Q-Former copy of an InstructBLIP prompt is cut at ``max_txt_len`` on ``prompt_truncation``.

        Args:
            prompts: one prompt per image, or one string for all ``batch_size`` images.
            batch_size: required with a single string.
        """
        if isinstance(prompts, str):
            if batch_size is None:
                raise DataError("one prompt string needs batch_size")
            prompts = [prompts] * batch_size
        prompts = list(prompts)
        truncate = self.causal and not self.config.instruction_aware
        ids, mask = self.llm.encode(
            prompts,
            max_length=self.lm.max_txt_len if truncate else None,
            truncation_side=self.lm.prompt_truncation,
            padding_side="left" if self.causal else "right",
        )
        qformer_ids, qformer_mask = self._qformer_tokens(prompts)
        return PromptBatch(ids, mask, qformer_ids, qformer_mask)

    def candidates(self, candidates: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Candidate answers/classes as continuations (right-padded): decoder-only without the leading bos
        (LAVIS drops it when packing), encoder-decoder with the closing </s>."""
        ids, mask = self.llm.encode(list(candidates))
        if self.causal and self.lm.add_bos:
            ids, mask = ids[:, 1:], mask[:, 1:]
        if ids.shape[1] == 0 or bool((mask.sum(dim=1) == 0).any()):
            raise DataError("every candidate needs at least one token")
        return ids, mask

    def generation_config(self, task: Task = "caption", **overrides: Any) -> GenerationConfig:
        """The reference's decoding settings for ``task``, with this model's eos/pad ids.

        * "caption": beam 5, at most 30 new tokens (pass ``min_new_tokens=8`` for COCO evaluation);
        * "vqa": beam 5, at most 10 new tokens, length_penalty 0 (decoder-only) / -1 (encoder-decoder);
        * "instruct": beam 5, at most 256 new tokens, repetition_penalty 1.5.

        Every setting can be overridden by keyword (``GenerationConfig`` fields).
        """
        base: dict[str, Any] = {"num_beams": 5, "min_new_tokens": 1}
        if task == "caption":
            base.update(max_new_tokens=30)
        elif task == "vqa":
            base.update(max_new_tokens=10, length_penalty=0.0 if self.causal else -1.0)
        elif task == "instruct":
            base.update(max_new_tokens=256, repetition_penalty=1.5)
        else:
            raise ConfigError(f"unknown generation task {task!r}; choose caption, vqa or instruct")
        base.update(eos_token_id=self.llm.end_of_text_id, pad_token_id=self.llm.pad_token_id)
        bos = self.lm.hf_config.get("bos_token_id")
        if self.lm.bos_placeholder and bos is not None:
            base["context_ids"] = (int(bos),)
        base.update(overrides)
        return GenerationConfig(**base)

    def decode(self, ids: Tensor) -> list[str]:
        """Generated ids (B, T) -> stripped strings."""
        return self.llm.decode(ids)

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``llm_tokenizer/`` (and ``qformer_tokenizer/``) into a model folder."""
        self.llm.save(Path(folder) / LLM_TOKENIZER_DIR)
        if self.qformer is not None:
            self.qformer.save(Path(folder) / QFORMER_TOKENIZER_DIR)


def shift_right(labels: Tensor, start_id: int, pad_id: int) -> Tensor:
    """Decoder inputs for encoder-decoder labels (B, T): start token first, -100 -> pad (T5's shift)."""
    shifted = torch.full_like(labels, start_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_id)


# ----------------------------------------------------------------------------------------------------------
# Task helpers: model + processor
# ----------------------------------------------------------------------------------------------------------


def lm_loss(model: Blip2, pixel_values: Tensor, batch: LMBatch) -> Tensor:
    """The stage-2 / InstructBLIP language-modelling loss of a batch (what LAVIS's ``forward`` returns)."""
    from vlkit.losses import causal_lm_loss, seq2seq_lm_loss

    prefix = model.llm_prefix(pixel_values, qformer_ids=batch.qformer_ids, qformer_mask=batch.qformer_mask)
    logits = model.lm_logits(
        prefix,
        batch.input_ids,
        batch.attention_mask,
        decoder_input_ids=batch.decoder_input_ids,
        decoder_attention_mask=batch.decoder_attention_mask,
    )
    if model.llm_kind == "causal":
        return causal_lm_loss(logits, batch.targets)
    return seq2seq_lm_loss(logits, batch.targets)


def _device(model: Blip2) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_text(
    model: Blip2,
    processor: LLMProcessor,
    pixel_values: Tensor,
    prompts: Sequence[str],
    config: GenerationConfig,
) -> list[str]:
    """Generate from images and one prompt per image; returns ``num_return_sequences`` strings per image."""
    batch = processor.prompts(prompts).to(_device(model))
    prefix = model.llm_prefix(pixel_values, qformer_ids=batch.qformer_ids, qformer_mask=batch.qformer_mask)
    ids = model.generate(prefix, batch.input_ids, batch.attention_mask, config)
    return processor.decode(ids)


def caption(
    model: Blip2,
    processor: LLMProcessor,
    pixel_values: Tensor,
    *,
    prompt: str | None = None,
    **generation: Any,
) -> list[str]:
    """Caption images (B, 3, S, S): beam 5, at most 30 new tokens, the model's prompt unless given.

    InstructBLIP models get "A short image caption." as the instruction when neither is set.
    Generation settings (``GenerationConfig`` fields) can be overridden by keyword.
    """
    if prompt is None:
        prompt = processor.lm.prompt or ("A short image caption." if processor.config.instruction_aware else "")
    config = processor.generation_config("caption", **generation)
    return generate_text(model, processor, pixel_values, [prompt] * pixel_values.shape[0], config)


def answer(
    model: Blip2,
    processor: LLMProcessor,
    pixel_values: Tensor,
    questions: Sequence[str],
    *,
    template: str = VQA_PROMPT,
    **generation: Any,
) -> list[str]:
    """Zero-shot VQA: each question is cleaned (``blip_question``), put in ``template`` and answered with
    beam 5, at most 10 new tokens, length_penalty 0 (decoder-only) / -1 (encoder-decoder)."""
    if len(questions) != pixel_values.shape[0]:
        raise DataError(f"{pixel_values.shape[0]} images but {len(questions)} questions")
    prompts = [template.format(blip_question(q)) for q in questions]
    config = processor.generation_config("vqa", **generation)
    return generate_text(model, processor, pixel_values, prompts, config)


@torch.no_grad()
def rank_candidates(
    model: Blip2,
    processor: LLMProcessor,
    pixel_values: Tensor,
    prompts: Sequence[str],
    candidates: Sequence[str],
    *,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Rank candidate answers by likelihood (InstructBLIP ``predict_class``).

    The loss of a candidate is the summed token cross-entropy of its tokens after ``[queries; prompt]``
    (LAVIS's Vicuna divides that sum by the padded length, the same for every candidate of a batch, and its
    FlanT5 uses the sum: both give this order).

    Returns:
        ``(ranks, losses)``: (B, N) candidate indices best first, and (B, N) summed losses.
    """
    batch = processor.prompts(list(prompts)).to(_device(model))
    prefix = model.llm_prefix(pixel_values, qformer_ids=batch.qformer_ids, qformer_mask=batch.qformer_mask)
    ids, mask = processor.candidates(candidates)
    device = _device(model)
    scores = model.score_candidates(
        prefix, batch.input_ids, batch.attention_mask, ids.to(device), mask.to(device), chunk_size=chunk_size
    )
    return torch.argsort(scores.sum, dim=-1), scores.sum
