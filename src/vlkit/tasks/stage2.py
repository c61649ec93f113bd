"""Tasks ``stage2``, ``caption_ft`` and ``vqa_ft``: BLIP-2 with a frozen LLM, and the machinery they share with
``instruct_tune`` (:mod:`vlkit.tasks.instruct`).

One step (blip2-spec.md §2.3-2.5)::

    image_embeds = ln_vision(ViT(image))                 ViT frozen (no grad, or cached features) or trained
    queries = Q-Former(query_tokens [; instruction])     the instruction enters only instruction-aware models
    prefix = language_projection(queries)                (B, Q, D_llm): the visual soft prompt
    loss = LM cross-entropy of the frozen LLM on [prefix; text]     prompt, query and pad positions ignored

The text of a batch is built by :class:`vlkit.prompting.LLMProcessor` with the reference's conventions of
the LLM family: OPT captions end with ``"\\n"`` and a model prompt's tokens (its BOS included) are not
targets; FlanT5 reads ``text_input`` in its encoder and predicts ``text_output``; InstructBLIP-Vicuna packs
instruction and response so that only response tokens are targets.

The tasks:

* ``stage2`` (§2.3): Q-Former, query tokens and ``ln_vision`` from a stage-1 checkpoint (vlkit folder,
  transformers folder or LAVIS ``.pth`` with its ViT file), the frozen LLM from a local transformers folder
  (e.g. what ``lm_pretrain`` exports), a new projection (PyTorch's default init). The stage-1 text-only
  parts (word/position embeddings, text feed-forward blocks, MLM head) and the ITC/ITM heads are dropped
  (the reference's variant), or, with ``keep_stage1``, carried unchanged into the exported model, which is
  then a full BLIP-2 that does retrieval/classification (Q-Former) and captioning/VQA (LLM).
* ``caption_ft`` (§2.4): from a stage-2 checkpoint, ViT trained (optionally at a larger ``image_size``, the
  position embedding interpolated; ``run.grad_checkpointing``), model prompt "a photo of" whose tokens are
  masked from the loss, and the caption text processor prepending "a photo of " (decoder-only LLMs; an
  encoder-decoder LLM reads the prompt in its encoder instead).
* ``vqa_ft``: fine-tuned VQA from a stage-2 BLIP-2 or InstructBLIP checkpoint (design below).

Training data (``train``, a list of :class:`LMSource`) are caption files, VQAv2 question/annotation pairs or
instruction JSONL files. A caption is a plain LM target (``stage2``/``caption_ft``), or, with ``prompts``,
the response to one of those instructions; a question goes through a prompt template and its answer is the
target; an instruction record is an instruction and its response.

Design of ``vqa_ft`` (no public LAVIS recipe; the paper fine-tunes VQAv2 with the question given to both the
Q-Former and the LLM, ViT trained): the question goes through the prompt template ("Question: {} Short
answer:") into the LLM and the answer is the target (one answer per question per step, drawn by annotator
frequency, or always the most common one). For a decoder-only BLIP-2 the text is ``"{prompt} {answer}\\n"``
with the prompt's tokens (BOS included) masked, exactly like a caption after the model prompt;
InstructBLIP-Vicuna models keep their packed instruction/response layout; FlanT5 reads the prompt in the
encoder and predicts the answer. The Q-Former also receives the prompt when the model is instruction-aware
(InstructBLIP), or, with ``qformer_text``, a BLIP-2 whose Q-Former kept its text input (``keep_stage1``) is
turned into an instruction-aware model (an ``instructblip`` folder with BLIP-2's text conventions) — the
paper's fine-tuned VQA architecture. The ViT is trained by default, as in the paper.

Evaluation during training (cheap, optional): COCO caption metrics (CIDEr, BLEU-4) on an eval-split caption
file and/or VQAv2 accuracy on a question/annotation pair, both through :mod:`vlkit.evaluation.tasks`; the
best checkpoint follows ``best_metric``. The final (or, with ``export: best``, the best) model is exported to
``RUN/model`` as a vlkit folder: config.yaml, model.safetensors with the LLM, ``llm_tokenizer/`` and
``qformer_tokenizer/``, loadable with :func:`vlkit.checkpoints.folder.load_checkpoint`.

Paths: data paths are relative to ``data_root``; checkpoint paths (``init``, ``init_vision``, ``llm``,
``tokenizer``) to ``models_root`` when it is set (e.g. the ``runs/`` folder of earlier stages), else to
``data_root`` (LAVIS keeps its weights in its cache root).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from vlkit import losses
from vlkit.errors import CheckpointError, ConfigError, DataError
from vlkit.generation import GenerationConfig
from vlkit.layers.vit import Block as VitBlock
from vlkit.models.blip2 import TORCH_DTYPES, Blip2, Blip2Config, LanguageModelConfig, build_llm, cast_parameters
from vlkit.models.instructblip import InstructBlipConfig
from vlkit.models.qformer import QFormerLayer
from vlkit.processors import IMAGE_PROCESSORS, blip_caption, blip_question, make_image_processor
from vlkit.prompting import VQA_PROMPT, LLMProcessor, LMBatch, PromptBatch
from vlkit.tasks.common import ln_vision_input, qformer_tokenizer, resolve_path, stack_field, vit_layer_id
from vlkit.training.task import TaskContext, TaskState

DETERMINISTIC_TRANSFORMS = ("blip_image_eval",)
INSTRUCT_CAPTION_PROMPT = "A short image caption."
INSTRUCT_VQA_PROMPT = "Question: {} Short Answer:"

# State-dict entries of a stage-1 BLIP-2 that later variants drop: the ITC/ITM heads and temperature, the
# Q-Former's MLM head, and (for the reference's stage 2) its text-only embeddings and feed-forward blocks.
_STAGE1_HEADS = re.compile(r"^(vision_proj|text_proj|itm_head)\.|^temp$|^qformer\.lm_head\.")
_QFORMER_TEXT = re.compile(r"^qformer\.(word_embed|pos_embed)\.|^qformer\.layers\.\d+\.text_ffn\.")


# ----------------------------------------------------------------------------------------------------------
# Recipe sections
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LMSource:
    """One training dataset (paths relative to ``task.data_root``).

    Attributes:
        kind: ``caption`` — LAVIS caption JSON files (train format, or eval format: one sample per caption);
            ``vqa`` — VQAv2 questions files (``annotations``) with their annotation files (``answers``);
            ``instruction`` — JSONL files of ``{image, instruction, response}`` records.
        annotations: the files described above.
        images: image root the entries' paths are relative to.
        answers: ``vqa`` only: one annotations file per questions file.
        image_template: ``vqa`` only: image path pattern over ``{image_id}`` and ``{data_subtype}`` (default
            COCO's; the shapes world's is in its manifest).
        prompts: ``caption``: instructions, one drawn at random per sample, that make the caption a response
            (instruction tuning); empty: the caption is a plain LM target after the model prompt.
            ``vqa``: templates with one ``{}`` for the question, one drawn per sample (default
            "Question: {} Short answer:"). ``instruction``: must be empty.
        transform: image pipeline (:data:`vlkit.processors.IMAGE_PROCESSORS`).
        answer: ``vqa``: draw one of the annotators' answers by frequency each time (``weighted``), or
            always take the most frequent one (``most_common``).
        repeat: use every sample this many times per epoch (up-weights a small dataset in a mix).
    """

    kind: Literal["caption", "vqa", "instruction"]
    annotations: list[Path]
    images: Path
    answers: list[Path] = field(default_factory=list)
    image_template: str | None = None
    prompts: list[str] = field(default_factory=list)
    transform: str = "blip2_image_train"
    answer: Literal["weighted", "most_common"] = "weighted"
    repeat: int = 1

    def __post_init__(self) -> None:
        where = "task.train[]"
        if not self.annotations:
            raise ConfigError(f"{where}.annotations: give at least one file")
        if self.transform not in IMAGE_PROCESSORS:
            raise ConfigError(f"{where}.transform: unknown {self.transform!r}; choose from {list(IMAGE_PROCESSORS)}")
        if self.repeat < 1:
            raise ConfigError(f"{where}.repeat must be >= 1, got {self.repeat}")
        if self.kind == "vqa":
            if len(self.answers) != len(self.annotations):
                raise ConfigError(f"{where}.answers: a vqa source needs one annotations file per questions file")
            bad = [p for p in self.prompts if p.count("{}") != 1]
            if bad:
                raise ConfigError(f"{where}.prompts: a vqa template needs exactly one {{}} for the question: {bad}")
        else:
            if self.answers or self.image_template is not None:
                raise ConfigError(f"{where}: answers and image_template apply to vqa sources only")
            if self.kind == "instruction" and self.prompts:
                raise ConfigError(f"{where}.prompts: instruction records carry their own instructions")
            bad = [p for p in self.prompts if "{}" in p]
            if bad:
                raise ConfigError(f"{where}.prompts: caption instructions take no {{}}: {bad}")

    @property
    def deterministic_text(self) -> bool:
        """Whether a sample's text never changes between epochs (no random prompt or answer)."""
        return len(self.prompts) <= 1 and (self.kind != "vqa" or self.answer == "most_common")


@dataclass
class CaptionVal:
    """Caption evaluation during training (COCO metrics CIDEr and BLEU-4 on an eval-split caption file).

    Attributes:
        annotations: eval-format caption JSON (``{image, caption: [...]}`` per image).
        images: image root.
        references: COCO ground-truth JSON (default: the caption lists of ``annotations``).
        prompt: LLM prompt (default: the model's; InstructBLIP: "A short image caption.").
        max_images: caption only the first N images.
        batch_size: images per generation call.
        num_beams, max_new_tokens, min_new_tokens: decoding (default: the reference's COCO settings, 5 beams,
            at most 30 / at least 8 new tokens; InstructBLIP 80 / 10; one fewer minimum for FlanT5).
    """

    annotations: Path
    images: Path
    references: Path | None = None
    prompt: str | None = None
    max_images: int | None = None
    batch_size: int = 32
    num_beams: int = 5
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None


@dataclass
class VqaVal:
    """VQAv2 accuracy during training.

    Attributes:
        questions, annotations: the VQAv2 questions and annotations files.
        images: image root; ``image_template``: image path pattern (default COCO's).
        template: prompt with one ``{}`` for the question (default "Question: {} Short answer:", InstructBLIP
            "Question: {} Short Answer:").
        max_questions: answer only the first N questions.
        batch_size: questions per generation call.
        num_beams, max_new_tokens: decoding (reference: 5 beams, at most 10 new tokens).
        length_penalty: default 0 for a decoder-only BLIP-2, -1 for encoder-decoder LLMs and InstructBLIP.
    """

    questions: Path
    annotations: Path
    images: Path
    image_template: str | None = None
    template: str | None = None
    max_questions: int | None = None
    batch_size: int = 32
    num_beams: int = 5
    max_new_tokens: int = 10
    length_penalty: float | None = None

    def __post_init__(self) -> None:
        if self.template is not None and self.template.count("{}") != 1:
            raise ConfigError(f"task.vqa_val.template must contain one {{}}, got {self.template!r}")


@dataclass
class LMTaskConfig:
    """Options shared by the LLM tasks (``stage2``, ``caption_ft``, ``vqa_ft``, ``instruct_tune``).

    Attributes:
        init: the checkpoint to start from (vlkit folder, transformers folder or LAVIS ``.pth``): stage 1 for
            ``stage2`` (and ``instruct_tune``), stage 2 / InstructBLIP for the fine-tuning tasks.
        init_vision: LAVIS ``init`` only: the EVA/CLIP ViT file (LAVIS checkpoints omit the frozen ViT).
        model: LAVIS ``init`` only: a ``vlkit.zoo`` preset fixing the architecture to load into.
        llm: local transformers folder of the frozen LLM (config.json, weights, tokenizer): required when
            ``init`` has no LLM (stage 1), and for a LAVIS stage-2 ``init``.
        llm_dtype: storage dtype of the frozen LLM (LAVIS: float16 for OPT/Vicuna, bfloat16 for FlanT5, on
            GPU); None keeps the checkpoint's (float32 for a converted one).
        tokenizer: the Q-Former tokenizer (vocab.txt or folder); default: the one saved with ``init``, else
            the installed bert-base-uncased vocabulary. Written to the exported folder.
        models_root: base of relative checkpoint paths (default: ``data_root``).
        data_root: base of relative data paths.
        train: training datasets (concatenated).
        caption_val, vqa_val: evaluation during training (optional).
        best_metric: evaluation result that picks the best checkpoint (``caption_CIDEr``, ``vqa_overall``,
            ...); default: ``caption_CIDEr`` with ``caption_val``, else ``vqa_overall`` with ``vqa_val``.
        export: export the ``final`` model, or the ``best`` checkpoint's (falls back to the final model
            when there was no evaluation).
        prompt: the model prompt stored in the exported config and masked from the loss (None: keep the
            checkpoint's; a stage-1 init starts from "").
        max_txt_len, max_output_txt_len: token limits of the text after the queries / of targets (None: the
            LLM family's reference values, or the checkpoint's).
        max_words: word limit of the caption/question text processors (50).
        freeze_vision: keep the ViT frozen (eval mode, no grad, not in checkpoints).
        image_size: train at this image size (position embedding interpolated), e.g. 364 for COCO captions.
        feature_cache: directory of a frozen-feature cache of the ViT output; needs ``freeze_vision`` and only
            deterministic transforms (``blip_image_eval``).
        attn_impl: attention implementation of the ViT and Q-Former ("sdpa" or the "eager" reference).
        join: how a decoder-only LLM reads prompt + target: ``pack`` (InstructBLIP-Vicuna: tokenised apart
            and packed), ``space`` (``"{prompt} {target}"`` tokenised together, prompt tokens masked: BLIP-2's
            convention for its "a photo of" prompt), ``auto``: ``pack`` for models that were InstructBLIP
            before this task, else ``space``.
    """

    init: Path | None = None
    init_vision: Path | None = None
    model: str | None = None
    llm: Path | None = None
    llm_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    tokenizer: Path | None = None
    models_root: Path | None = None
    data_root: Path | None = None
    train: list[LMSource] = field(default_factory=list)
    caption_val: CaptionVal | None = None
    vqa_val: VqaVal | None = None
    best_metric: str | None = None
    export: Literal["final", "best"] = "final"
    prompt: str | None = None
    max_txt_len: int | None = None
    max_output_txt_len: int | None = None
    max_words: int = 50
    freeze_vision: bool = True
    image_size: int | None = None
    feature_cache: Path | None = None
    attn_impl: Literal["sdpa", "eager"] = "sdpa"
    join: Literal["auto", "pack", "space"] = "auto"

    def __post_init__(self) -> None:
        if self.init is None:
            raise ConfigError("task.init: give the checkpoint to start from (see the task's documentation)")
        if not self.train:
            raise ConfigError("task.train: give at least one training dataset")
        for key in ("max_txt_len", "max_output_txt_len", "image_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"task.{key} must be >= 1, got {value}")
        if self.feature_cache is not None:
            if not self.freeze_vision:
                raise ConfigError("task.feature_cache needs freeze_vision: true (a trained ViT changes its features)")
            random_tf = [s.transform for s in self.train if s.transform not in DETERMINISTIC_TRANSFORMS]
            if random_tf:
                raise ConfigError(
                    f"task.feature_cache needs deterministic transforms ({', '.join(DETERMINISTIC_TRANSFORMS)}); "
                    f"got {random_tf}"
                )


@dataclass
class Stage2Config(LMTaskConfig):
    """Options of the ``stage2`` task (see :class:`LMTaskConfig`), plus:

    Attributes:
        keep_stage1: carry the stage-1 ITC/ITM heads, MLM head and Q-Former text parts into the exported model
            unchanged (never trained here, not in training checkpoints): a full BLIP-2 for retrieval,
            classification, captioning and VQA. The shared Q-Former layers are still trained by the LM loss
            unless ``freeze_qformer``.
        freeze_qformer: keep the stage-1 Q-Former, query tokens and ``ln_vision`` frozen and train only the
            projection: with ``keep_stage1`` the export then retrieves and classifies exactly as the stage-1
            model (the ITC/ITM heads only fit the Q-Former they were trained with; a Q-Former trained by the
            LM loss loses them).
        prefix_lm: encoder-decoder LLMs: split each caption at a random word into an encoder prefix and a
            decoder target (the paper's prefix-LM objective; the LAVIS datasets feed the whole caption as the
            target after the model prompt, the default).
    """

    keep_stage1: bool = False
    freeze_qformer: bool = False
    prefix_lm: bool = False


@dataclass
class CaptionFTConfig(LMTaskConfig):
    """Options of the ``caption_ft`` task (see :class:`LMTaskConfig`), plus:

    Attributes:
        caption_prefix: text the caption processor prepends to every caption for a decoder-only LLM (None:
            the model prompt followed by a space, e.g. "a photo of "); encoder-decoder LLMs read the prompt
            in their encoder instead.
    """

    prompt: str | None = "a photo of"
    freeze_vision: bool = False
    caption_prefix: str | None = None
    export: Literal["final", "best"] = "best"


@dataclass
class VqaFTConfig(LMTaskConfig):
    """Options of the ``vqa_ft`` task (see :class:`LMTaskConfig` and the module docstring), plus:

    Attributes:
        qformer_text: give the prompt to the Q-Former as well: turns a BLIP-2 whose Q-Former has text input
            (``stage2`` with ``keep_stage1``) into an instruction-aware model; InstructBLIP models always get it.
    """

    freeze_vision: bool = False
    qformer_text: bool = False


# ----------------------------------------------------------------------------------------------------------
# The model seen by the trainer
# ----------------------------------------------------------------------------------------------------------


class LMTaskModel(nn.Module):
    """A BLIP-2 / InstructBLIP with its LM loss and generation as forward modes.

    DDP and FSDP synchronise/gather parameters only inside ``__call__``, so training and the evaluation's
    generation both go through :meth:`forward`.
    """

    def __init__(self, blip2: Blip2) -> None:
        super().__init__()
        self.blip2 = blip2

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.blip2.vision.set_grad_checkpointing(enable)

    def image_embeds(self, pixel_values: Tensor | None, vision_embeds: Tensor | None) -> Tensor:
        """``ln_vision`` of the ViT output (B, N, Dv); a frozen ViT runs without grad; cached output is used as is."""
        return ln_vision_input(self.blip2, pixel_values, vision_embeds, "LMTaskModel")

    def forward(
        self,
        mode: Literal["loss", "generate"] = "loss",
        *,
        pixel_values: Tensor | None = None,
        vision_embeds: Tensor | None = None,
        lm: LMBatch | None = None,
        prompts: PromptBatch | None = None,
        generation: GenerationConfig | None = None,
    ) -> dict[str, Tensor] | Tensor:
        """The LM loss (``mode="loss"`` with ``lm``) or generated ids (``"generate"`` with ``prompts``).

        Args:
            pixel_values: (B, 3, S, S), or ``vision_embeds`` (B, N, Dv): cached ViT output.
            lm: the text of a training batch (:meth:`vlkit.prompting.LLMProcessor.training_batch`).
            prompts: generation prompts (:meth:`vlkit.prompting.LLMProcessor.prompts`).
            generation: decoding settings.

        Returns:
            ``{"loss"}``, or (B, T_new) new token ids.
        """
        blip2 = self.blip2
        image_embeds = self.image_embeds(pixel_values, vision_embeds)
        if mode == "loss":
            if lm is None:
                raise ValueError("mode='loss' needs lm (an LMBatch)")
            prefix = blip2.llm_prefix(
                image_embeds=image_embeds, qformer_ids=lm.qformer_ids, qformer_mask=lm.qformer_mask
            )
            logits = blip2.lm_logits(
                prefix,
                lm.input_ids,
                lm.attention_mask,
                decoder_input_ids=lm.decoder_input_ids,
                decoder_attention_mask=lm.decoder_attention_mask,
            )
            if blip2.llm_kind == "causal":
                return {"loss": losses.causal_lm_loss(logits, lm.targets)}
            return {"loss": losses.seq2seq_lm_loss(logits, lm.targets)}
        if mode == "generate":
            if prompts is None or generation is None:
                raise ValueError("mode='generate' needs prompts and generation")
            prefix = blip2.llm_prefix(
                image_embeds=image_embeds, qformer_ids=prompts.qformer_ids, qformer_mask=prompts.qformer_mask
            )
            return blip2.generate(prefix, prompts.input_ids, prompts.attention_mask, generation)
        raise ValueError(f"unknown mode {mode!r}")


# ----------------------------------------------------------------------------------------------------------
# Assembling models
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Assembled:
    """A model ready for an LLM task, with its tokenizers.

    Attributes:
        model: the model (on CPU, eval mode).
        llm_tokenizer: the LLM's transformers tokenizer.
        qformer_tokenizer: the Q-Former tokenizer (``QFormerTokenizer``), or None.
        was_instruction_aware: the checkpoint was an InstructBLIP before this task (decides ``join: auto``).
        stage1_parts: ``keep_stage1``: the stage-1-only tensors (vlkit names) that the export adds back.
        export_config: ``keep_stage1``: the config of the exported full model.
    """

    model: Blip2
    llm_tokenizer: Any
    qformer_tokenizer: Any = None
    was_instruction_aware: bool = False
    stage1_parts: dict[str, Tensor] = field(default_factory=dict)
    export_config: Blip2Config | None = None


def _arch(config: Blip2Config) -> str:
    return "instructblip" if isinstance(config, InstructBlipConfig) else "blip2"


def load_llm_folder(
    path: str | os.PathLike, *, instruction: bool, vicuna_tokens: bool = True
) -> tuple[LanguageModelConfig, dict[str, Tensor], Any]:
    """The frozen LLM of a local transformers folder: ``(LanguageModelConfig, state dict under "llm.", tokenizer)``.

    The text conventions are the reference's for the LLM family (probed from the tokenizer). T5-family
    feed-forwards run with exact GELU, as LAVIS overrides them. For InstructBLIP with a decoder-only LLM and
    ``vicuna_tokens``, the tokenizer gets InstructBLIP-Vicuna's overrides (``[PAD]`` added, bos = eos = unk =
    ``</s>``) and the LLM's vocabulary grows to fit.

    Raises:
        CheckpointError: no config.json, weights or tokenizer in the folder.
    """
    from vlkit.checkpoints.hf import lm_config_from_hf
    from vlkit.checkpoints.lavis import grow_vocabulary, read_llm_folder
    from vlkit.prompting import instructblip_vicuna_tokenizer

    hf_config, weights, tokenizer = read_llm_folder(path)
    if tokenizer is None:
        raise CheckpointError(f"{path}: no tokenizer files beside the LLM (save its tokenizer into the folder)")
    lm = lm_config_from_hf(hf_config, instruction=instruction, tokenizer=tokenizer)
    lm = dataclasses.replace(lm, exact_gelu=True, path=str(path))
    if instruction and lm.kind == "causal" and vicuna_tokens:
        tokenizer = instructblip_vicuna_tokenizer(tokenizer)
        weights = grow_vocabulary(dict(weights), lm.hf_config, len(tokenizer))
    return lm, {f"llm.{k}": v for k, v in weights.items()}, tokenizer


def _check_drop(dropped: Sequence[str], allowed: Sequence[re.Pattern[str]], source: str) -> None:
    stray = [k for k in dropped if not any(p.search(k) for p in allowed)]
    if stray:
        raise CheckpointError(f"{source}: tensors that the target model has no place for: {', '.join(stray[:10])}")


def convert_state(
    state_dict: Mapping[str, Tensor],
    target: Blip2Config,
    *,
    drop: Sequence[re.Pattern[str]],
    new: Mapping[str, Tensor] | None = None,
    source: str,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The entries of ``state_dict`` that a model of config ``target`` holds, plus ``new`` ones.

    Every entry the target lacks must match one of ``drop`` (it is returned apart), and every entry the target
    needs must come from ``state_dict`` or ``new``: nothing is silently lost or left at random.

    Returns:
        ``(state dict for target, dropped entries)``.

    Raises:
        CheckpointError: an entry that is neither kept nor allowed to be dropped, or a missing one.
    """
    from vlkit.models import ARCHS

    _, model_cls = ARCHS[_arch(target)]
    wanted = set(model_cls(target, device="meta").state_dict())
    out = {k: v for k, v in state_dict.items() if k in wanted}
    dropped = {k: v for k, v in state_dict.items() if k not in wanted}
    _check_drop(list(dropped), drop, source)
    for key, value in (new or {}).items():
        if key in out:
            raise CheckpointError(f"{source}: {key} is both in the checkpoint and among the new tensors")
        out[key] = value
    return out, dropped


def _build(config: Blip2Config, state_dict: Mapping[str, Tensor], source: str) -> Blip2:
    from vlkit.checkpoints.folder import build_loaded

    return build_loaded(_arch(config), config, state_dict, source=source)


def from_stage1(
    stage1: Blip2,
    lm: LanguageModelConfig,
    llm_state: Mapping[str, Tensor],
    *,
    instruction: bool,
    keep_stage1: bool = False,
    source: str = "stage-1 checkpoint",
) -> tuple[Blip2, dict[str, Tensor], Blip2Config | None]:
    """A stage-2 BLIP-2 (or InstructBLIP) from a stage-1 model, an LLM and a new projection.

    Q-Former, query tokens, ``ln_vision`` and the ViT come from ``stage1``; the projection is a new
    ``nn.Linear`` (PyTorch's default initialisation, drawn from the global RNG). BLIP-2 drops the stage-1 heads
    and the Q-Former's text parts (returned apart, with the full model's config, when ``keep_stage1``);
    InstructBLIP keeps the text parts and drops the heads.

    Returns:
        ``(model, stage-1-only tensors, config of the full model or None)``.
    """
    c = stage1.config
    if c.lm is not None:
        raise ConfigError(f"{source} already has an LLM: start stage 2 from a stage-1 model")
    if instruction:
        if not c.qformer.text_input:
            raise ConfigError(f"{source}: InstructBLIP needs a Q-Former with text input (a stage-1 model has one)")
        qformer = dataclasses.replace(c.qformer, lm_head=False)
        target: Blip2Config = InstructBlipConfig(
            vision=c.vision,
            qformer=qformer,
            num_query_tokens=c.num_query_tokens,
            embed_dim=c.embed_dim,
            ln_vision_eps=c.ln_vision_eps,
            lm=lm,
        )
        drop = [_STAGE1_HEADS]
    else:
        qformer = dataclasses.replace(c.qformer, text_input=False, lm_head=False)
        target = Blip2Config(
            vision=c.vision,
            qformer=qformer,
            num_query_tokens=c.num_query_tokens,
            embed_dim=c.embed_dim,
            ln_vision_eps=c.ln_vision_eps,
            itc_itm_heads=False,
            lm=lm,
        )
        drop = [_STAGE1_HEADS, _QFORMER_TEXT]
    if keep_stage1 and instruction:
        raise ConfigError("task.keep_stage1 applies to BLIP-2 stage 2, not to InstructBLIP")
    width = build_llm(lm, device="meta").get_input_embeddings().embedding_dim
    projection = nn.Linear(c.qformer.hidden_size, width)
    new = {f"language_projection.{k}": v.detach() for k, v in projection.state_dict().items()}
    new.update(llm_state)
    state, dropped = convert_state(stage1.state_dict(), target, drop=drop, new=new, source=source)
    model = _build(target, state, source)
    if not keep_stage1:
        return model, {}, None
    return model, dropped, dataclasses.replace(c, lm=lm)


def to_instruction_aware(model: Blip2, *, source: str) -> Blip2:
    """A BLIP-2 whose Q-Former has text input, as an instruction-aware model (the prompt enters the
    Q-Former), dropping the stage-1 heads. The LLM and its conventions are unchanged."""
    c = model.config
    if not c.qformer.text_input:
        raise ConfigError(
            f"{source}: qformer_text needs a Q-Former with text input (stage 2 with keep_stage1, or InstructBLIP)"
        )
    target = InstructBlipConfig(
        vision=c.vision,
        qformer=dataclasses.replace(c.qformer, lm_head=False),
        num_query_tokens=c.num_query_tokens,
        embed_dim=c.embed_dim,
        ln_vision_eps=c.ln_vision_eps,
        lm=c.lm,
    )
    state, _ = convert_state(model.state_dict(), target, drop=[_STAGE1_HEADS], source=source)
    return _build(target, state, source)


def resize_images(model: Blip2, image_size: int, *, source: str) -> Blip2:
    """The model at another image size, its position embedding interpolated as the reference does."""
    from vlkit.checkpoints.lavis import fit_pos_embed

    c = model.config
    if image_size == c.vision.image_size:
        return model
    vision = dataclasses.replace(c.vision, image_size=image_size)
    config = dataclasses.replace(c, vision=vision)
    state = dict(model.state_dict())
    fit_pos_embed(state, vision, source=source)
    return _build(config, state, source)


def model_path(cfg: LMTaskConfig, path: Path | None) -> Path | None:
    """A checkpoint path of the recipe, made absolute against ``models_root`` (else ``data_root``)."""
    return resolve_path(path, cfg.models_root if cfg.models_root is not None else cfg.data_root)


def load_init(cfg: LMTaskConfig) -> Any:
    """``vlkit.checkpoints.folder.load_checkpoint`` of ``cfg.init`` (with the LAVIS extras), float32."""
    from vlkit.checkpoints.folder import load_checkpoint
    from vlkit.checkpoints.lavis import is_lavis_file

    init = model_path(cfg, cfg.init)
    lavis = is_lavis_file(init)
    if not lavis and (cfg.model is not None or cfg.init_vision is not None):
        raise ConfigError("task.model and task.init_vision only apply to a LAVIS init (.pth)")
    extra: dict[str, Any] = {}
    if lavis:
        extra = {"vision": model_path(cfg, cfg.init_vision), "preset": cfg.model}
    return load_checkpoint(init, dtype=torch.float32, **extra)


def _with_lm_overrides(model: Blip2, cfg: LMTaskConfig) -> Blip2:
    """Apply the recipe's prompt / length limits / LLM dtype to the model config (in place)."""
    lm = model.config.lm
    changes: dict[str, Any] = {}
    if cfg.prompt is not None:
        changes["prompt"] = cfg.prompt
    for key in ("max_txt_len", "max_output_txt_len"):
        if getattr(cfg, key) is not None:
            changes[key] = getattr(cfg, key)
    if cfg.llm_dtype is not None:
        changes["dtype"] = cfg.llm_dtype
        cast_parameters(model.llm, TORCH_DTYPES[cfg.llm_dtype])
    if changes:
        model.config.lm = dataclasses.replace(lm, **changes)
    return model


def _qformer_tokenizer_for(cfg: LMTaskConfig, loaded_tokenizer: Any, vocab_size: int | None) -> Any:
    init = model_path(cfg, cfg.init)
    if cfg.tokenizer is None and loaded_tokenizer is not None:
        tokenizer = loaded_tokenizer
    else:
        folder = init if init is not None and init.is_dir() else None
        tokenizer = qformer_tokenizer(
            model_path(cfg, cfg.tokenizer), folder / "qformer_tokenizer" if folder is not None else None, folder
        )
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ConfigError(
            f"the Q-Former tokenizer {tokenizer.source} has {len(tokenizer)} tokens but the model's Q-Former only "
            f"{vocab_size}; set task.tokenizer to the one the model was trained with"
        )
    return tokenizer


def assemble_stage2(
    cfg: LMTaskConfig, *, instruction: bool, keep_stage1: bool = False, vicuna_tokens: bool = True
) -> Assembled:
    """The model of ``stage2`` / ``instruct_tune``: a stage-1 ``init`` + the ``llm`` folder, or (instruction
    tuning only) an InstructBLIP ``init`` to continue from."""
    loaded = load_init(cfg)
    model = loaded.model
    source = str(model_path(cfg, cfg.init))
    if not isinstance(model, Blip2):
        raise ConfigError(f"task.init: {source} is not a BLIP-2 model")
    if model.config.lm is not None:
        if instruction and model.config.instruction_aware:
            if cfg.llm is not None:
                raise ConfigError("task.llm: the InstructBLIP init already has its LLM")
            text = model.config.qformer.vocab_size
            qtok = _qformer_tokenizer_for(cfg, loaded.qformer_tokenizer, text)
            return Assembled(model, _need_llm_tokenizer(loaded, source), qtok, was_instruction_aware=True)
        raise ConfigError(f"task.init: {source} already has an LLM; this task starts from a stage-1 model")
    if cfg.llm is None:
        raise ConfigError("task.llm: give the local transformers folder of the frozen LLM")
    llm_dir = model_path(cfg, cfg.llm)
    lm, llm_state, llm_tokenizer = load_llm_folder(llm_dir, instruction=instruction, vicuna_tokens=vicuna_tokens)
    lm = dataclasses.replace(lm, prompt="")
    qtok = None
    if model.config.qformer.text_input:
        qtok = _qformer_tokenizer_for(cfg, loaded.qformer_tokenizer, model.config.qformer.vocab_size)
    built, stage1_parts, export_config = from_stage1(
        model, lm, llm_state, instruction=instruction, keep_stage1=keep_stage1, source=source
    )
    return Assembled(built, llm_tokenizer, qtok, False, stage1_parts, export_config)


def _need_llm_tokenizer(loaded: Any, source: str) -> Any:
    if loaded.llm_tokenizer is None:
        raise ConfigError(f"task.init: {source} has no LLM tokenizer (a vlkit folder keeps it in llm_tokenizer/)")
    return loaded.llm_tokenizer


def assemble_finetune(cfg: LMTaskConfig, *, qformer_text: bool = False) -> Assembled:
    """The model of ``caption_ft`` / ``vqa_ft``: a stage-2 BLIP-2 or InstructBLIP ``init`` (a LAVIS one with
    ``llm``), optionally at another image size or turned instruction-aware."""
    from vlkit.checkpoints.folder import load_checkpoint
    from vlkit.checkpoints.lavis import is_lavis_file

    init = model_path(cfg, cfg.init)
    source = str(init)
    if is_lavis_file(init):
        if cfg.llm is None:
            raise ConfigError("task.llm: a LAVIS stage-2 init needs the local folder of its LLM")
        loaded = load_checkpoint(
            init,
            dtype=torch.float32,
            vision=model_path(cfg, cfg.init_vision),
            llm=model_path(cfg, cfg.llm),
            preset=cfg.model,
        )
    else:
        if cfg.llm is not None:
            raise ConfigError("task.llm: the init folder already holds its LLM")
        loaded = load_init(cfg)
    model = loaded.model
    if not isinstance(model, Blip2) or model.config.lm is None:
        raise ConfigError(f"task.init: {source} is not a stage-2 BLIP-2 or InstructBLIP model (it has no LLM)")
    was_instruct = model.config.instruction_aware
    if cfg.image_size is not None:
        model = resize_images(model, cfg.image_size, source=source)
    qtok = None
    if model.config.qformer.text_input:
        qtok = _qformer_tokenizer_for(cfg, loaded.qformer_tokenizer, model.config.qformer.vocab_size)
    if qformer_text and not model.config.instruction_aware:
        model = to_instruction_aware(model, source=source)
    return Assembled(model, _need_llm_tokenizer(loaded, source), qtok, was_instruct)


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    source: int
    image: str  # path relative to the source's image root
    kind: str
    payload: tuple[Any, ...]  # caption: (text,); vqa: (question, answers, weights); instruction: (instr, resp)


class LMDataset(Dataset):
    """Samples ``{"image" | "vision_embeds", "key", "text_input", "text_output"}`` of the training sources.

    ``text_output`` is None for a plain caption (an LM target after the model prompt). Random choices (one of
    several prompts, one answer by frequency) use the global ``random`` module, which the trainer seeds per
    sample.

    Args:
        sources: the recipe's sources; ``root``: the data root.
        caption_prefix: prepended to plain captions (``caption_ft``: "a photo of ").
        max_words: text processor word limit.
        image_size: side of the image transforms.
        with_images: load and transform images (False: keys only, for cached features).
    """

    def __init__(
        self,
        sources: Sequence[LMSource],
        root: Path | None,
        *,
        caption_prefix: str = "",
        max_words: int = 50,
        image_size: int = 224,
        with_images: bool = True,
    ) -> None:
        from vlkit.data.datasets import CaptionDataset, InstructionDataset, VQADataset

        self.sources = list(sources)
        self.roots = [resolve_path(s.images, root) for s in sources]
        self.processors = [make_image_processor(s.transform, image_size) for s in sources]
        self.caption_prefix, self.max_words, self.with_images = caption_prefix, max_words, with_images
        self.records: list[_Record] = []
        for index, src in enumerate(self.sources):
            files = [resolve_path(p, root) for p in src.annotations]
            records: list[_Record] = []
            if src.kind == "caption":
                reader = CaptionDataset(files, self.roots[index])
                for ann in reader.annotation:
                    captions = ann["captions"] if reader.is_eval else [ann["caption"]]
                    records += [_Record(index, ann["image"], "caption", (c,)) for c in captions]
            elif src.kind == "vqa":
                for questions, answers in zip(files, src.answers):
                    extra = {"image_template": src.image_template} if src.image_template is not None else {}
                    vqa = VQADataset(questions, resolve_path(answers, root), self.roots[index], **extra)
                    for q in vqa.questions:
                        answers_q, weights = _answer_weights(q["answers"])
                        if not answers_q:
                            raise DataError(f"{answers}: question {q['question_id']} has no answer")
                        records.append(_Record(index, q["image"], "vqa", (q["question"], answers_q, weights)))
            else:
                for path in files:
                    reader = InstructionDataset(path, self.roots[index])
                    records += [
                        _Record(index, r["image"], "instruction", (r["instruction"], r["response"]))
                        for r in reader.records
                    ]
            if not records:
                raise DataError(f"task.train[{index}]: no samples in {[str(f) for f in files]}")
            self.records += records * src.repeat

    def __len__(self) -> int:
        return len(self.records)

    def key(self, record: _Record) -> str:
        """The image's full path (the frozen-feature cache key)."""
        return str(self.roots[record.source] / record.image)

    def texts(self, record: _Record) -> tuple[str, str | None]:
        """``(text_input, text_output)`` of a record (a random draw where the source has choices)."""
        src = self.sources[record.source]
        if record.kind == "caption":
            caption = blip_caption(record.payload[0], max_words=self.max_words)
            if not src.prompts:
                return self.caption_prefix + caption, None
            return random.choice(src.prompts), caption
        if record.kind == "vqa":
            question, answers, weights = record.payload
            template = random.choice(src.prompts) if src.prompts else VQA_PROMPT
            if src.answer == "most_common" or len(answers) == 1:
                answer = answers[max(range(len(answers)), key=lambda i: weights[i])]
            else:
                answer = random.choices(answers, weights=weights)[0]
            return template.format(blip_question(question, self.max_words)), answer
        instruction, response = record.payload
        return blip_question(instruction, self.max_words), blip_caption(response, max_words=self.max_words)

    def image(self, record: _Record) -> Tensor:
        from vlkit.data.images import load_image

        return self.processors[record.source](load_image(self.roots[record.source] / record.image))

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        text_input, text_output = self.texts(record)
        sample: dict[str, Any] = {"key": self.key(record), "text_input": text_input, "text_output": text_output}
        if self.with_images:
            sample["image"] = self.image(record)
        return sample


def _answer_weights(answers: Sequence[str]) -> tuple[list[str], list[float]]:
    """Distinct answers (first-seen order) and their share of the annotators."""
    counts: dict[str, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    total = sum(counts.values())
    return list(counts), [c / total for c in counts.values()]


class _CachedSamples(Dataset):
    def __init__(self, base: LMDataset, cache: Any) -> None:
        self.base, self.cache = base, cache

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.base[index]
        sample["vision_embeds"] = self.cache.get(sample["key"])
        return sample


def _cached(dataset: LMDataset, cfg: LMTaskConfig, ctx: TaskContext, blip2: Blip2, info: dict[str, Any]) -> Dataset:
    from vlkit.data.images import load_image
    from vlkit.training.feature_cache import FeatureCache, fingerprint_module, transform_signature

    processor = dataset.processors[0]
    cache = FeatureCache(
        resolve_path(cfg.feature_cache, cfg.data_root),
        encoder_fingerprint=fingerprint_module(blip2.vision, extra=f"autocast={ctx.precision}"),
        transform_signature=transform_signature(processor),
    )
    keys = [dataset.key(r) for r in dataset.records]
    computed = cache.fill(
        keys,
        load=lambda key: processor(load_image(key)),
        encode=blip2.vision.to(ctx.device),
        device=ctx.device,
        autocast_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(ctx.precision),
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    info["feature cache"] = f"{cache.dir} ({computed} computed, {len(set(keys)) - computed} cached)"
    return _CachedSamples(dataset, cache)


# ----------------------------------------------------------------------------------------------------------
# Text batches
# ----------------------------------------------------------------------------------------------------------


def split_prefix(caption: str) -> tuple[str, str]:
    """Split a caption at a random word into ``(prefix, suffix)``, the suffix never empty (prefix-LM)."""
    words = caption.split(" ")
    cut = random.randrange(len(words))  # 0 .. n-1 words in the prefix
    return " ".join(words[:cut]), " ".join(words[cut:])


def lm_batch(
    processor: LLMProcessor,
    text_input: Sequence[str],
    text_output: Sequence[str | None],
    *,
    join: Literal["pack", "space"],
    prefix_lm: bool = False,
) -> LMBatch:
    """The LM-loss text of a batch whose samples are plain targets (``text_output`` None) or prompt/target pairs.

    * encoder-decoder LLM: a plain target becomes ``(model prompt, target)`` (or, with ``prefix_lm``, a random
      prefix/suffix split); then :meth:`LLMProcessor.training_batch`.
    * decoder-only, ``pack`` (InstructBLIP-Vicuna): a plain target becomes ``("", target)``; then
      ``training_batch``'s packed layout.
    * decoder-only, ``space``: each row is one text, ``text_input`` for a plain target (the caption, after any
      prefix the text processor added) or ``"{text_input} {text_output}"`` for a pair, + the end of text
      ("\\n" for OPT), cut at ``max_txt_len``. Not targets: padding, the model prompt's tokens of a plain
      target (its BOS included, as LAVIS's ``prompt_len``; with no model prompt the BOS stays a target, the
      reference's quirk), and a pair's prompt tokens with the BOS. For a batch of plain targets this is exactly
      ``training_batch(text_input)``.
    """
    lm, tok = processor.lm, processor.llm
    inputs, outputs = list(text_input), list(text_output)
    if len(inputs) != len(outputs):
        raise DataError(f"{len(inputs)} text_input but {len(outputs)} text_output")
    if not processor.causal:
        pairs = []
        for inp, out in zip(inputs, outputs):
            if out is None:
                pairs.append(split_prefix(inp) if prefix_lm else (lm.prompt, inp))
            else:
                pairs.append((inp, out))
        return processor.training_batch([p[0] for p in pairs], [p[1] for p in pairs])
    if join == "pack":
        pairs = [("", inp) if out is None else (inp, out) for inp, out in zip(inputs, outputs)]
        return processor.training_batch([p[0] for p in pairs], [p[1] for p in pairs])
    texts = [inp if out is None else f"{inp} {out}" if inp else out for inp, out in zip(inputs, outputs)]
    ids, mask = tok.encode(texts, max_length=lm.max_txt_len, suffix=tok.target_suffix)
    model_prompt = tok.prompt_length(lm.prompt) if lm.prompt else 0
    prompt_lens = [
        model_prompt if out is None else tok.prompt_length(inp) if inp else 0 for inp, out in zip(inputs, outputs)
    ]
    targets = losses.causal_lm_targets(ids, num_query_tokens=processor.num_query_tokens, pad_id=tok.pad_token_id)
    q = processor.num_query_tokens
    for row, length in enumerate(prompt_lens):
        targets[row, q : q + length] = losses.IGNORE_INDEX
    qformer_ids = qformer_mask = None
    if processor.config.instruction_aware:
        qformer_ids, qformer_mask = processor.qformer(
            [p if o is not None else "" for p, o in zip(inputs, outputs)], max_length=lm.max_txt_len
        )
    return LMBatch(ids, mask, targets, qformer_ids=qformer_ids, qformer_mask=qformer_mask)


def _collate(processor: LLMProcessor, join: Literal["pack", "space"], prefix_lm: bool, field_name: str):
    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = lm_batch(
            processor,
            [s["text_input"] for s in samples],
            [s["text_output"] for s in samples],
            join=join,
            prefix_lm=prefix_lm,
        )
        return {field_name: stack_field(samples, field_name), "lm": batch}

    return collate


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


def evaluator(
    cfg: LMTaskConfig, ctx: TaskContext, processor: LLMProcessor, image_size: int
) -> Callable[[nn.Module], dict[str, float]] | None:
    """Caption metrics and/or VQA accuracy of the model in training (None without ``caption_val``/``vqa_val``)."""
    if cfg.caption_val is None and cfg.vqa_val is None:
        return None
    from vlkit.data.datasets import CaptionDataset, VQADataset
    from vlkit.evaluation.tasks import run_caption, run_vqa
    from vlkit.metrics.caption import load_coco_references

    root, device = cfg.data_root, ctx.device
    image_processor = make_image_processor("blip_image_eval", image_size)
    instruct = processor.config.instruction_aware

    def run(net: nn.Module, pixels: Tensor, prompts: list[str], generation: GenerationConfig) -> list[str]:
        batch = processor.prompts(prompts).to(device)
        ids = net("generate", pixel_values=pixels.to(device), prompts=batch, generation=generation)
        return processor.decode(ids)

    caption = None
    if cfg.caption_val is not None:
        v = cfg.caption_val
        dataset = CaptionDataset(resolve_path(v.annotations, root), resolve_path(v.images, root), image_processor)
        refs = load_coco_references(resolve_path(v.references, root)) if v.references is not None else None
        max_len, min_len = (80, 10) if instruct else (30, 8)
        generation = processor.generation_config(
            "caption",
            num_beams=v.num_beams,
            max_new_tokens=v.max_new_tokens if v.max_new_tokens is not None else max_len,
            min_new_tokens=v.min_new_tokens
            if v.min_new_tokens is not None
            else min_len - (0 if processor.causal else 1),
        )
        prompt = v.prompt if v.prompt is not None else (INSTRUCT_CAPTION_PROMPT if instruct else processor.lm.prompt)
        caption = (dataset, refs, generation, prompt)

    vqa = None
    if cfg.vqa_val is not None:
        v = cfg.vqa_val
        extra = {"image_template": v.image_template} if v.image_template is not None else {}
        dataset_q = VQADataset(
            resolve_path(v.questions, root),
            resolve_path(v.annotations, root),
            resolve_path(v.images, root),
            image_processor,
            **extra,
        )
        from vlkit.metrics.vqa import load_vqa_annotations

        annotations = load_vqa_annotations(resolve_path(v.annotations, root))
        penalty = v.length_penalty
        if penalty is None:
            penalty = -1.0 if instruct or not processor.causal else 0.0
        generation = processor.generation_config(
            "vqa", num_beams=v.num_beams, max_new_tokens=v.max_new_tokens, length_penalty=penalty
        )
        template = v.template or (INSTRUCT_VQA_PROMPT if instruct else VQA_PROMPT)
        vqa = (dataset_q, annotations, generation, template)

    def evaluate(net: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        if caption is not None:
            dataset, refs, generation, prompt = caption
            result = run_caption(
                lambda pixels: run(net, pixels, [prompt] * pixels.shape[0], generation),
                dataset,
                refs,
                metrics=("Bleu_4", "CIDEr"),
                batch_size=cfg.caption_val.batch_size,
                limit=cfg.caption_val.max_images,
                progress=False,
            )
            out |= {f"caption_{k}": float(v) for k, v in result.metrics.items() if v is not None}
        if vqa is not None:
            dataset_q, annotations, generation, template = vqa
            result = run_vqa(
                lambda pixels, qs: run(net, pixels, [template.format(blip_question(q)) for q in qs], generation),
                dataset_q,
                annotations,
                batch_size=cfg.vqa_val.batch_size,
                limit=cfg.vqa_val.max_questions,
                progress=False,
            )
            out |= {f"vqa_{k}": float(v) for k, v in result.metrics.items() if v is not None and k != "agg_metrics"}
        return out

    return evaluate


# ----------------------------------------------------------------------------------------------------------
# Building a task
# ----------------------------------------------------------------------------------------------------------


def _layer_classes(module: nn.Module) -> tuple[type[nn.Module], ...]:
    names = set(getattr(module, "_no_split_modules", None) or ())
    return tuple({type(m) for m in module.modules() if type(m).__name__ in names})


def build_task(
    cfg: LMTaskConfig,
    ctx: TaskContext,
    assembled: Assembled,
    *,
    task: str,
    caption_prefix: str = "",
    prefix_lm: bool = False,
    default_join: Literal["pack", "space"] | None = None,
    frozen_parts: Sequence[str] = (),
) -> TaskState:
    """The :class:`TaskState` of an LLM task around an assembled model (shared by every LLM task).

    Args:
        cfg: the task's options; ctx: the run; assembled: the model and tokenizers.
        task: the task's name (provenance in the exported folder).
        caption_prefix: prepended to plain captions (``caption_ft``).
        prefix_lm: random prefix/suffix split of plain captions for encoder-decoder LLMs.
        default_join: what ``join: auto`` means (None: ``pack`` for models that were InstructBLIP before).
        frozen_parts: further parts of the BLIP-2 to freeze: submodules (e.g. ``"qformer"``, ``"ln_vision"``)
            or ``"query_tokens"``.
    """
    blip2 = assembled.model
    _with_lm_overrides(blip2, cfg)
    blip2.set_attn_impl(cfg.attn_impl)
    config, lm = blip2.config, blip2.config.lm
    if config.instruction_aware and lm.max_txt_len > config.qformer.max_position_embeddings:
        raise ConfigError(
            f"the Q-Former reads instructions of up to max_txt_len={lm.max_txt_len} tokens but has only "
            f"{config.qformer.max_position_embeddings} positions: set task.max_txt_len"
        )
    blip2.freeze_llm(True)
    blip2.freeze_vision(cfg.freeze_vision)
    for name in frozen_parts:
        if name == "query_tokens":
            _constant_query_tokens(blip2)
        else:
            blip2.get_submodule(name).requires_grad_(False)
    blip2.train()
    processor = LLMProcessor(config, assembled.llm_tokenizer, assembled.qformer_tokenizer)
    join: Literal["pack", "space"]
    if cfg.join == "auto":
        join = default_join or ("pack" if assembled.was_instruction_aware else "space")
    else:
        join = cfg.join
    info: dict[str, Any] = {
        "init": str(model_path(cfg, cfg.init)),
        "model": f"{_arch(config)} with a frozen {lm.hf_config['model_type']} ({lm.kind}), prompt {lm.prompt!r}",
        "LLM tokenizer": f"{len(processor.llm)} tokens, text join {join!r}",
    }
    if assembled.stage1_parts:
        info["kept stage-1 parts"] = f"{len(assembled.stage1_parts)} tensors, added back at export"

    dataset = LMDataset(
        cfg.train,
        cfg.data_root,
        caption_prefix=caption_prefix,
        max_words=cfg.max_words,
        image_size=config.vision.image_size,
        with_images=cfg.feature_cache is None,
    )
    info["training samples"] = str(len(dataset))
    if cfg.feature_cache is not None:
        train_dataset, field_name = _cached(dataset, cfg, ctx, blip2, info), "vision_embeds"
    else:
        train_dataset, field_name = dataset, "image"
    deterministic = (
        cfg.feature_cache is not None or all(s.transform in DETERMINISTIC_TRANSFORMS for s in cfg.train)
    ) and (all(s.deterministic_text for s in cfg.train) and not prefix_lm)

    def training_step(net: LMTaskModel, batch: dict[str, Any]) -> Mapping[str, Tensor]:
        return net("loss", pixel_values=batch.get("image"), vision_embeds=batch.get("vision_embeds"), lm=batch["lm"])

    evaluate = evaluator(cfg, ctx, processor, config.vision.image_size)
    best = cfg.best_metric
    if best is None and evaluate is not None:
        best = "caption_CIDEr" if cfg.caption_val is not None else "vqa_overall"
    qtok = assembled.qformer_tokenizer
    stage1_parts, export_config = assembled.stage1_parts, assembled.export_config

    def export(net: nn.Module, state_dict: Mapping[str, Tensor], folder: Path) -> None:
        from vlkit.checkpoints.folder import save_pretrained
        from vlkit.checkpoints.io import read_checkpoint
        from vlkit.training import checkpointing as ckpt

        weights = {k.removeprefix("blip2."): v for k, v in state_dict.items()}
        best_file = ctx.output_dir / ckpt.CHECKPOINTS / ckpt.BEST / ckpt.MODEL_FILE
        if cfg.export == "best" and best_file.is_file():
            for key, value in read_checkpoint(best_file).items():
                weights[key.removeprefix("blip2.")] = value
        target = net.blip2.config
        if stage1_parts:  # the full BLIP-2: trained shared parts + the stage-1 parts carried along
            weights.update(stage1_parts)
            qformer = dataclasses.replace(target.qformer, text_input=True, lm_head=export_config.qformer.lm_head)
            target = dataclasses.replace(export_config, vision=target.vision, qformer=qformer, lm=target.lm)
        model = _build(target, weights, f"the trained {task} model")
        save_pretrained(
            model,
            folder,
            source=f"vlkit train {task}",
            llm_tokenizer=processor.llm.tokenizer,
            qformer_tokenizer=qtok,
        )

    depth = config.vision.depth
    return TaskState(
        model=LMTaskModel(blip2),
        train_dataset=train_dataset,
        training_step=training_step,
        collate_fn=_collate(processor, join, prefix_lm, field_name),
        frozen=(
            "blip2.llm",
            *(("blip2.vision",) if cfg.freeze_vision else ()),
            *(f"blip2.{n}" for n in frozen_parts if n != "query_tokens"),
        ),
        layer_id=vit_layer_id("blip2.vision.", depth),
        num_layers=depth + 1,
        evaluate=evaluate,
        best_metric=best,
        fsdp_units=(VitBlock, QFormerLayer, *_layer_classes(blip2.llm)),
        find_unused_parameters=config.instruction_aware,
        deterministic_data=deterministic,
        info=info,
        export=export,
    )


def _constant_query_tokens(blip2: Blip2) -> None:
    """Turn the query tokens into a buffer: never trained, still in the state dict (and the export) under the
    same name. (The trainer freezes submodules; the query tokens are a bare parameter of the model.)"""
    tokens = blip2.query_tokens.detach()
    del blip2.query_tokens
    blip2.register_buffer("query_tokens", tokens)


def build(cfg: LMTaskConfig, ctx: TaskContext) -> TaskState:
    """Build ``stage2``, ``caption_ft`` or ``vqa_ft`` (chosen by the config's type; see :mod:`vlkit.training.task`)."""
    if isinstance(cfg, Stage2Config):
        if cfg.image_size is not None:
            raise ConfigError("task.image_size: stage 2 trains at the stage-1 image size (see caption_ft)")
        assembled = assemble_stage2(cfg, instruction=False, keep_stage1=cfg.keep_stage1)
        frozen = ("qformer", "ln_vision", "query_tokens") if cfg.freeze_qformer else ()
        return build_task(cfg, ctx, assembled, task="stage2", prefix_lm=cfg.prefix_lm, frozen_parts=frozen)
    if isinstance(cfg, CaptionFTConfig):
        assembled = assemble_finetune(cfg)
        lm = assembled.model.config.lm
        prompt = cfg.prompt if cfg.prompt is not None else lm.prompt
        prefix = cfg.caption_prefix
        if prefix is None:
            prefix = f"{prompt} " if prompt else ""
        causal = lm.kind == "causal"
        return build_task(cfg, ctx, assembled, task="caption_ft", caption_prefix=prefix if causal else "")
    if isinstance(cfg, VqaFTConfig):
        assembled = assemble_finetune(cfg, qformer_text=cfg.qformer_text)
        return build_task(cfg, ctx, assembled, task="vqa_ft")
    raise ConfigError(f"vlkit.tasks.stage2 cannot build a {type(cfg).__name__}")
