"""Task ``stage1``: BLIP-2 Q-Former representation learning (ITC + ITM + ITG), and retrieval fine-tuning.

One step (blip2-spec.md §2.1), with the losses of :mod:`vlkit.losses`::

    image_embeds = ln_vision(ViT(image))                  (ViT frozen: no grad; or cached features)
    queries = Q-Former(query_tokens, image_embeds)         self-attention K/V cached for ITG
    ITC  = itc_loss(vision_proj(queries), text_proj(text [CLS]), temp)     label smoothing 0.1
    ITM  = itm_loss over [pos; neg image; neg text] triplets, negatives drawn from the ITC similarities
           (+ optional word-swapped captions as extra non-matches: ``itm_text_negatives``)
    ITG  = itg_loss of the causal text pass over the cached query K/V, [DEC] in place of [CLS]
    loss = ITC + ITM + ITG

With ``image_ids: true`` (retrieval fine-tuning, §2.2) the batch carries dense int64 image ids: every
caption of the same image is an ITC positive, and same-image pairs are never drawn as ITM negatives.

Initialisation: a checkpoint (``init``: vlkit folder, transformers folder or LAVIS ``.pth`` with its ViT
file), or a preset/architecture built from scratch, optionally with the Q-Former from a local BERT folder
(``bert``, :mod:`vlkit.checkpoints.bert`) and the ViT from an EVA/CLIP file (``vision_weights``). The ViT
is frozen (``freeze_vision``, the pretraining default) or trained (retrieval fine-tuning, the shapes demo),
with real layer-wise lr decay (``optim.layer_decay``) numbered as LAVIS numbers it.

With a frozen ViT and the deterministic eval transform, ``feature_cache`` computes the ViT output once per
image (:mod:`vlkit.training.feature_cache`) and trains on it.

Evaluation (optional ``val``): ITC retrieval recall on a held-out caption file (and optionally zero-shot
classification by ITC on an image folder); the best checkpoint follows ``itc_r_mean``. At the end the
final model is exported to ``RUN/model`` as a vlkit folder (config.yaml + model.safetensors + tokenizer
files) that ``vlkit.checkpoints.folder.load_model`` and later stages load.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vlkit import losses
from vlkit.data.webdataset import expand_shards
from vlkit.errors import ConfigError
from vlkit.layers.vit import Block as VitBlock
from vlkit.models.blip2 import Blip2, Blip2Config
from vlkit.models.qformer import QFormerLayer
from vlkit.processors import IMAGE_PROCESSORS, BlipCaptionProcessor, make_image_processor
from vlkit.tasks.common import (
    PairDataset,
    ln_vision_input,
    load_vit_file,
    qformer_tokenizer,
    resolve_path,
    stack_field,
    vit_layer_id,
)
from vlkit.training.task import TaskContext, TaskState

DETERMINISTIC_TRANSFORMS = ("blip_image_eval",)


@dataclass
class CaptionSource:
    """One training caption dataset: LAVIS caption files with an image root, or WebDataset tar shards.

    Attributes:
        annotations: LAVIS caption JSON files (train format ``{image, caption, image_id}``, or eval format
            with caption lists, which give one pair per caption), relative to ``task.data_root``.
        images: image root the entries' ``image`` paths are relative to (annotation files only).
        shards: instead of annotation files: WebDataset tar shard patterns (``cc3m/{00000..00331}.tar``,
            relative to ``task.data_root``), each sample an image with a ``.txt`` (or ``.json`` "caption").
        transform: image pipeline, a name of :data:`vlkit.processors.IMAGE_PROCESSORS`
            (``blip2_image_train`` for COCO, ``blip_image_train`` for VG, ``blip_image_eval`` for none).
    """

    annotations: list[Path] = field(default_factory=list)
    images: Path | None = None
    shards: list[str] = field(default_factory=list)
    transform: str = "blip2_image_train"

    def __post_init__(self) -> None:
        if bool(self.annotations) == bool(self.shards):
            raise ConfigError("task.train[]: give annotations (with images) or shards, not both or neither")
        if self.annotations and self.images is None:
            raise ConfigError("task.train[].images: annotation files need their image root")
        if self.shards and self.images is not None:
            raise ConfigError("task.train[].images: tar shards hold their images; remove images")
        if self.transform not in IMAGE_PROCESSORS:
            raise ConfigError(
                f"task.train[].transform: unknown {self.transform!r}; choose from {list(IMAGE_PROCESSORS)}"
            )


@dataclass
class RetrievalVal:
    """Held-out retrieval data for evaluation during training.

    Attributes:
        annotations: eval-format caption JSON (``{image, caption: [...]}`` per image).
        images: image root.
        max_images: use only the first N images (and their captions); None = all.
        batch_size: images / texts per forward pass.
    """

    annotations: Path
    images: Path
    max_images: int | None = None
    batch_size: int = 64


@dataclass
class ClassificationVal:
    """Held-out zero-shot classification by ITC similarity (an image folder, one sub-folder per class).

    Attributes:
        root: the image folder; ``labels``: optional label-names file (line order = class index).
        template: prompt with one ``{}`` for the class name, e.g. ``"a {}"``.
        max_images: use only the first N images; None = all.
    """

    root: Path
    labels: Path | None = None
    template: str = "{}"
    max_images: int | None = None

    def __post_init__(self) -> None:
        if self.template.count("{}") != 1:
            raise ConfigError(f"task.classification.template must contain one {{}}, got {self.template!r}")


_WORD = re.compile(r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*")  # a word of a caption (hyphenated words whole)


@dataclass
class TextNegatives:
    """Word-swapped captions as extra ITM non-matches (hard negatives made from the text, as NegCLIP does).

    In each caption that holds a word of a group, one such occurrence (drawn at random) is replaced by another
    word of its group ("a red circle left of a blue square" -> "a red cross left of a blue square"). With
    ``exchange``, a caption with two different words of one group gets them exchanged instead ("a red square
    left of a blue circle": the same words, bound the other way round). Each swapped caption is scored by the
    ITM head against its own image, labelled "no match"; captions without a group word add nothing. ITC is
    left as it is: in the shapes world, such near-duplicates as ITC negatives kept its loss at chance.

    Measured on the shapes world (configs/shapes/README.md): replacing shape words raised the downstream VQA
    accuracies by 3-5 points and lowered zero-shot classification by 2; exchanging them gave nothing.

    Attributes:
        groups: lists of interchangeable words (matched whole and case-insensitively), e.g. the shape names.
        exchange: prefer exchanging two different group words of the caption over replacing one.
    """

    groups: list[list[str]] = field(default_factory=list)
    exchange: bool = False

    def __post_init__(self) -> None:
        words = [w.lower() for g in self.groups for w in g]
        if not self.groups or any(len(set(w.lower() for w in g)) < 2 for g in self.groups):
            raise ConfigError("task.itm_text_negatives.groups: give groups of at least two different words")
        if len(set(words)) != len(words):
            raise ConfigError("task.itm_text_negatives.groups: a word may belong to one group only")
        bad = [w for w in words if not _WORD.fullmatch(w)]
        if bad:
            raise ConfigError(f"task.itm_text_negatives.groups: {bad} are not single words")


def swap_words(text: str, groups: list[list[str]], draw: Callable[[int], int], *, exchange: bool = False) -> str | None:
    """``text`` with group words exchanged or replaced (see :class:`TextNegatives`), or None without any.

    Args:
        text: the caption.
        groups: word groups.
        draw: ``draw(n)`` -> an int in ``[0, n)``, the source of randomness.
        exchange: prefer exchanging two different words of one group.
    """
    group_of = {w.lower(): i for i, g in enumerate(groups) for w in g}
    spans = [
        (m.start(), m.end(), group_of[m.group(0).lower()])
        for m in _WORD.finditer(text)
        if m.group(0).lower() in group_of
    ]
    if not spans:
        return None
    if exchange:
        pairs = [
            (a, b)
            for i, a in enumerate(spans)
            for b in spans[i + 1 :]
            if a[2] == b[2] and text[a[0] : a[1]].lower() != text[b[0] : b[1]].lower()
        ]
        if pairs:
            (a0, a1, _), (b0, b1, _) = pairs[draw(len(pairs))]
            return text[:a0] + text[b0:b1] + text[a1:b0] + text[a0:a1] + text[b1:]
    start, end, group = spans[draw(len(spans))]
    others = [w for w in groups[group] if w.lower() != text[start:end].lower()]
    return text[:start] + others[draw(len(others))] + text[end:]


@dataclass
class Stage1Config:
    """Options of the ``stage1`` task.

    Attributes:
        model: a ``vlkit.zoo`` preset fixing the architecture (random init); with a LAVIS ``init`` it names
            the architecture to load into (e.g. ``blip2-vitg-coco``: 364 px, position embedding resized).
        architecture: an explicit :class:`~vlkit.models.blip2.Blip2Config` instead of a preset.
        init: checkpoint to start from: a vlkit folder, a transformers BLIP-2 folder or a LAVIS ``.pth``.
        init_vision: the EVA/CLIP ViT file that goes with a LAVIS ``init`` without ``visual_encoder.*``.
        bert: from scratch: a transformers BERT folder for the Q-Former (blip2-spec §1.6).
        vision_weights: from scratch: an EVA-CLIP / OpenAI-CLIP ViT file for the ViT.
        tokenizer: Q-Former tokenizer (vocab.txt or folder); default: ``bert``'s, ``init``'s, else the
            installed bert-base-uncased vocabulary. A from-scratch model's vocabulary is sized to it.
        data_root: base of every relative data path below (``--set task.data_root=...``).
        train: training caption datasets (concatenated).
        val: retrieval evaluation data (ITC recall), or None.
        classification: zero-shot classification evaluation data, or None.
        max_txt_len: captions are truncated to this many tokens (32 in the reference).
        padding: ``max_length`` pads every caption to ``max_txt_len`` (the reference); ``longest`` pads to the
            longest caption of the batch: the same losses for less compute, but only in a single process
            (ITM gathers token ids across ranks, which needs one length everywhere).
        max_words: ``blip_caption`` word limit (50).
        freeze_vision: keep the ViT frozen (eval mode, no grad); False trains it (retrieval FT, shapes demo).
        image_ids: retrieval fine-tuning: multi-positive ITC and same-image ITM masking by dense image ids.
        feature_cache: directory of a frozen-feature cache; needs ``freeze_vision`` and only
            ``blip_image_eval`` transforms.
        attn_impl: attention implementation of the whole model ("sdpa" or the "eager" reference).
        init_std: from scratch only: initialise the Q-Former, the query tokens and the heads with
            normal(0, init_std) instead of BERT's 0.02 (biases 0, LayerNorms 1/0). BERT's value suits width
            768; a narrow model trained from scratch starts with almost image-independent query outputs
            under it (cross-attention averages the image tokens with tiny weights) and its ITC loss stays at
            log(batch) for hundreds of steps. ``0.02 * sqrt(768 / hidden_size)`` keeps BERT's scale.
        itm_text_negatives: word-swapped captions as extra ITM non-matches (:class:`TextNegatives`); not in
            the reference, off by default.
    """

    model: str | None = None
    architecture: Blip2Config | None = None
    init: Path | None = None
    init_vision: Path | None = None
    bert: Path | None = None
    vision_weights: Path | None = None
    tokenizer: Path | None = None
    data_root: Path | None = None
    train: list[CaptionSource] = field(default_factory=list)
    val: RetrievalVal | None = None
    classification: ClassificationVal | None = None
    max_txt_len: int = 32
    padding: Literal["max_length", "longest"] = "max_length"
    max_words: int = 50
    freeze_vision: bool = True
    image_ids: bool = False
    feature_cache: Path | None = None
    attn_impl: Literal["sdpa", "eager"] = "sdpa"
    init_std: float | None = None
    itm_text_negatives: TextNegatives | None = None

    def __post_init__(self) -> None:
        if not self.train:
            raise ConfigError("task.train: give at least one caption dataset")
        if self.model is not None and self.architecture is not None:
            raise ConfigError("task: give model (a preset) or architecture, not both")
        if self.init is not None:
            if self.architecture is not None or self.bert is not None or self.vision_weights is not None:
                raise ConfigError(
                    "task.init loads a whole model: do not combine it with architecture, bert or vision_weights"
                )
        elif self.model is None and self.architecture is None:
            raise ConfigError("task: set model (a vlkit.zoo preset), architecture, or init (a checkpoint)")
        if self.init_vision is not None and self.init is None:
            raise ConfigError(
                "task.init_vision goes with a LAVIS task.init; use vision_weights when starting from scratch"
            )
        if self.init_std is not None and (self.init is not None or self.bert is not None or self.init_std <= 0):
            raise ConfigError("task.init_std: a positive value, for a Q-Former trained from scratch (no init, no bert)")
        if self.max_txt_len < 2:
            raise ConfigError(f"task.max_txt_len must be >= 2 ([CLS] ... [SEP]), got {self.max_txt_len}")
        if self.feature_cache is not None:
            if not self.freeze_vision:
                raise ConfigError("task.feature_cache needs freeze_vision: true (a trained ViT changes its features)")
            random_tf = [s.transform for s in self.train if s.transform not in DETERMINISTIC_TRANSFORMS]
            if random_tf:
                raise ConfigError(
                    f"task.feature_cache needs deterministic transforms ({', '.join(DETERMINISTIC_TRANSFORMS)}); "
                    f"got {random_tf}"
                )


class Stage1Model(nn.Module):
    """BLIP-2 with the stage-1 objectives as its forward pass.

    DDP and FSDP synchronise/gather parameters only inside ``__call__`` of the module they wrap, so every
    use of the model (training losses, evaluation features) goes through :meth:`forward`.

    Args:
        blip2: the model.
        dec_token_id: id of ``[DEC]`` (the tokenizer's BOS).
        pad_token_id: id of ``[PAD]``.
        image_ids: use image ids in ITC/ITM (retrieval fine-tuning).
    """

    def __init__(self, blip2: Blip2, *, dec_token_id: int, pad_token_id: int, image_ids: bool = False) -> None:
        super().__init__()
        self.blip2 = blip2
        self.dec_token_id = dec_token_id
        self.pad_token_id = pad_token_id
        self.use_image_ids = image_ids

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.blip2.vision.set_grad_checkpointing(enable)

    def image_embeds(self, pixel_values: Tensor | None, vision_embeds: Tensor | None) -> Tensor:
        """``ln_vision`` of the ViT output (B, N, Dv); a frozen ViT runs without grad; cached output is used as is."""
        return ln_vision_input(self.blip2, pixel_values, vision_embeds, "Stage1Model")

    def forward(
        self,
        mode: Literal["loss", "image", "text"] = "loss",
        *,
        pixel_values: Tensor | None = None,
        vision_embeds: Tensor | None = None,
        text_ids: Tensor | None = None,
        text_mask: Tensor | None = None,
        image_ids: Tensor | None = None,
        neg_text_ids: Tensor | None = None,
        neg_text_mask: Tensor | None = None,
        neg_owner: Tensor | None = None,
    ) -> dict[str, Tensor] | Tensor:
        """Stage-1 losses (``mode="loss"``), or evaluation features.

        Args:
            mode: ``loss`` -> {"loss", "loss_itc", "loss_itm", "loss_itg", "temp"}; ``image`` -> image_feats
                (B, Q, E); ``text`` -> text_feat (B, E).
            pixel_values: (B, 3, S, S), or ``vision_embeds`` (B, N, Dv): cached ViT output.
            text_ids, text_mask: (B, T) tokenised captions ([CLS] ... [SEP], padded).
            image_ids: (B,) int64 dense image ids (used when the model was built with ``image_ids``).
            neg_text_ids, neg_text_mask: (M, T) extra ITM non-matching captions (``itm_text_negatives``),
                padded like ``text_ids``; neg_owner: (M,) the local sample whose image each is scored with.
        """
        blip2 = self.blip2
        if mode == "text":
            text_output = blip2.encode_text(text_ids, text_mask)
            with _full_precision(text_output):
                return blip2.project_text(text_output.float())
        image_embeds = self.image_embeds(pixel_values, vision_embeds)  # (B, N, Dv)
        if mode == "image":
            query_output = blip2.encode_queries(image_embeds).query_output
            with _full_precision(query_output):
                return blip2.project_image(query_output.float())
        if mode != "loss":
            raise ValueError(f"unknown mode {mode!r}")
        if text_ids is None or text_mask is None:
            raise ValueError("the stage-1 losses need text_ids and text_mask")
        queries = blip2.encode_queries(image_embeds, use_cache=True)
        text_output = blip2.encode_text(text_ids, text_mask)
        ids = image_ids if self.use_image_ids else None
        if self.use_image_ids and ids is None:
            raise ValueError("this task uses image ids (retrieval fine-tuning), but the batch has none")
        with _full_precision(text_output):
            # The contrastive head runs in fp32 under autocast: early in training the features of different
            # images differ by less than bf16's resolution near 1.0 (2^-7), which would flatten the logits.
            image_feats = blip2.project_image(queries.query_output.float())  # (B, Q, E)
            text_feat = blip2.project_text(text_output.float())  # (B, E)
            itc = losses.itc_loss(image_feats, text_feat, blip2.temp, image_ids=ids)

        negatives = losses.sample_itm_negatives(itc.sim_i2t, itc.sim_t2i, itc.positive_mask)
        itm = losses.build_itm_batch(image_embeds, text_ids, text_mask, negatives)
        if neg_text_ids is not None:
            if neg_text_mask is None or neg_owner is None:
                raise ValueError("neg_text_ids need neg_text_mask and neg_owner")
            itm = losses.add_itm_text_negatives(itm, image_embeds, neg_owner, neg_text_ids, neg_text_mask)
        loss_itm = losses.itm_loss(blip2.itm_logits(itm.image_embeds, itm.text_ids, itm.text_mask), itm.labels)

        decoder_ids, labels = losses.itg_inputs(text_ids, dec_token_id=self.dec_token_id, pad_id=self.pad_token_id)
        logits = blip2.itg_logits(decoder_ids, queries.cache, text_mask).logits  # (B, T, V)
        loss_itg = losses.itg_loss(logits, labels)

        total = itc.loss + loss_itm + loss_itg
        return {
            "loss": total,
            "loss_itc": itc.loss.detach(),
            "loss_itm": loss_itm.detach(),
            "loss_itg": loss_itg.detach(),
            "temp": blip2.temp.detach(),
        }


def _full_precision(like: Tensor):
    """Autocast switched off on ``like``'s device (a no-op outside autocast)."""
    return torch.autocast(like.device.type, enabled=False)


# ----------------------------------------------------------------------------------------------------------
# Building the model
# ----------------------------------------------------------------------------------------------------------


def _build_blip2(cfg: Stage1Config, tokenizer: Any, info: dict[str, Any]) -> Blip2:
    from vlkit import zoo

    root = cfg.data_root
    if cfg.init is not None:
        from vlkit.checkpoints.folder import load_model
        from vlkit.checkpoints.lavis import is_lavis_file

        init = resolve_path(cfg.init, root)
        lavis = is_lavis_file(init)
        if cfg.model is not None and not lavis:
            raise ConfigError(
                "task.model only applies to a LAVIS init (a vlkit/transformers folder has its own config)"
            )
        model = load_model(
            init,
            dtype=torch.float32,
            vision=resolve_path(cfg.init_vision, root) if lavis else None,
            preset=cfg.model if lavis else None,
        )
        if not isinstance(model, Blip2) or not model.config.itc_itm_heads or not model.config.qformer.lm_head:
            raise ConfigError(f"task.init: {init} is not a stage-1 BLIP-2 model (needs ITC/ITM heads and the MLM head)")
        vocab = model.config.qformer.vocab_size
        if vocab != len(tokenizer):
            raise ConfigError(
                f"task.init: {init} has a Q-Former vocabulary of {vocab}, the tokenizer has {len(tokenizer)} tokens "
                "(with [DEC]); set task.tokenizer to the tokenizer the model was trained with"
            )
        info["init"] = str(init)
        return model

    config = zoo.get_spec(cfg.model).config() if cfg.model is not None else cfg.architecture
    config = copy.deepcopy(config)  # never mutate the recipe's config object
    if not config.itc_itm_heads or not config.qformer.lm_head:
        raise ConfigError("task: the stage-1 architecture needs itc_itm_heads and qformer.lm_head")
    # The preset's vocabulary is bert-base-uncased + [DEC]; a model trained from scratch uses its tokenizer's.
    qformer = dataclasses.replace(config.qformer, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config = dataclasses.replace(config, qformer=qformer)
    model = Blip2(config)
    info["model"] = cfg.model or "architecture from the recipe"
    if cfg.init_std is not None:
        _normal_init(model, cfg.init_std)
        info["init"] = f"Q-Former, query tokens and heads normal(0, {cfg.init_std})"
    if cfg.vision_weights is not None:
        path = resolve_path(cfg.vision_weights, root)
        info["vision weights"] = f"{load_vit_file(model.vision, path)} tensors from {path}"
    if cfg.bert is not None:
        from vlkit.checkpoints.bert import init_qformer_from_bert

        info["Q-Former init"] = init_qformer_from_bert(model.qformer, resolve_path(cfg.bert, root)).summary()
    return model


@torch.no_grad()
def _normal_init(model: Blip2, std: float) -> None:
    """BERT-style initialisation with another std for everything but the ViT (see ``Stage1Config.init_std``)."""
    parts = [model.qformer, *(m for m in (model.vision_proj, model.text_proj, model.itm_head) if m is not None)]
    for part in parts:
        for module in part.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
    if model.qformer.lm_head is not None:
        nn.init.zeros_(model.qformer.lm_head.bias)
    nn.init.normal_(model.query_tokens, std=std)


def _collate_fn(tokenizer: Any, cfg: Stage1Config, field_name: str):
    negatives = cfg.itm_text_negatives

    def draw(n: int) -> int:  # torch's generator: seeded by the run (and per DataLoader worker)
        return int(torch.randint(n, ()))

    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        texts = [s["text"] for s in samples]
        swapped: list[tuple[int, str]] = []
        if negatives is not None:
            for i, text in enumerate(texts):
                other = swap_words(text, negatives.groups, draw, exchange=negatives.exchange)
                if other is not None:
                    swapped.append((i, other))
        # one call: the swapped captions are padded to the captions' length (the ITM batch stacks them)
        ids, mask = tokenizer(texts + [t for _, t in swapped], padding=cfg.padding, max_length=cfg.max_txt_len)
        n = len(texts)
        batch = {field_name: stack_field(samples, field_name), "text_ids": ids[:n], "text_mask": mask[:n]}
        if negatives is not None:
            batch["neg_text_ids"], batch["neg_text_mask"] = ids[n:], mask[n:]  # (M, T)
            batch["neg_owner"] = torch.tensor([i for i, _ in swapped], dtype=torch.long)  # (M,)
        if cfg.image_ids:
            batch["image_ids"] = torch.tensor([s["image_id"] for s in samples], dtype=torch.long)
        return batch

    return collate


def build(cfg: Stage1Config, ctx: TaskContext) -> TaskState:
    """Build the ``stage1`` task (see :mod:`vlkit.training.task` for the contract)."""
    if cfg.padding == "longest" and ctx.world_size > 1:
        raise ConfigError(
            "task.padding=longest works in one process only (ITM gathers equal-length ids); use max_length"
        )
    root = cfg.data_root
    tokenizer = qformer_tokenizer(
        resolve_path(cfg.tokenizer, root), resolve_path(cfg.bert, root), resolve_path(cfg.init, root)
    )
    info: dict[str, Any] = {"tokenizer": f"{tokenizer.source} ({len(tokenizer)} tokens with [DEC])"}
    blip2 = _build_blip2(cfg, tokenizer, info)
    blip2.set_attn_impl(cfg.attn_impl)
    if cfg.freeze_vision:
        blip2.freeze_vision(True)
    model = Stage1Model(
        blip2, dec_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, image_ids=cfg.image_ids
    )
    size = blip2.config.vision.image_size
    text_processor = BlipCaptionProcessor(max_words=cfg.max_words)
    sources = [
        (
            [resolve_path(a, root) for a in s.annotations] + [p for pat in s.shards for p in expand_shards(pat, root)],
            resolve_path(s.images, root),
            make_image_processor(s.transform, size),
        )
        for s in cfg.train
    ]

    if cfg.feature_cache is not None:
        dataset, field_name = _cached_dataset(cfg, ctx, blip2, sources, text_processor, info), "vision_embeds"
    else:
        dataset, field_name = PairDataset(sources, text_processor), "image"
    info["training pairs"] = f"{len(dataset)} ({dataset.num_images if hasattr(dataset, 'num_images') else '?'} images)"

    def training_step(net: Stage1Model, batch: dict[str, Any]) -> Mapping[str, Tensor]:
        return net(
            "loss",
            pixel_values=batch.get("image"),
            vision_embeds=batch.get("vision_embeds"),
            text_ids=batch["text_ids"],
            text_mask=batch["text_mask"],
            image_ids=batch.get("image_ids"),
            neg_text_ids=batch.get("neg_text_ids"),
            neg_text_mask=batch.get("neg_text_mask"),
            neg_owner=batch.get("neg_owner"),
        )

    evaluate = _evaluator(cfg, ctx, tokenizer, size) if cfg.val is not None or cfg.classification is not None else None
    depth = blip2.config.vision.depth
    deterministic = cfg.feature_cache is not None or all(s.transform in DETERMINISTIC_TRANSFORMS for s in cfg.train)

    def export(net: nn.Module, state_dict: Mapping[str, Tensor], folder: Path) -> None:
        from vlkit.checkpoints.folder import save_pretrained

        config = net.blip2.config
        fresh = Blip2(config, device="meta")
        weights = {k.removeprefix("blip2."): v for k, v in state_dict.items()}
        fresh.load_state_dict(weights, strict=True, assign=True)
        # qformer_tokenizer/ is where load_checkpoint (vlkit eval, vlkit.load) looks; the copy at the top
        # level is what task.tokenizer / a later task.init resolve to.
        save_pretrained(fresh, folder, preset=cfg.model, source="vlkit train stage1", qformer_tokenizer=tokenizer)
        tokenizer.save(folder)

    return TaskState(
        model=model,
        train_dataset=dataset,
        training_step=training_step,
        collate_fn=_collate_fn(tokenizer, cfg, field_name),
        frozen=("blip2.vision",) if cfg.freeze_vision else (),
        layer_id=vit_layer_id("blip2.vision.", depth),
        num_layers=depth + 1,
        evaluate=evaluate,
        best_metric="itc_r_mean" if cfg.val is not None else ("zs_top1" if evaluate is not None else None),
        fsdp_units=(VitBlock, QFormerLayer),
        deterministic_data=deterministic,
        info=info,
        export=export,
    )


class _CachedPairs(torch.utils.data.Dataset):
    """Pairs without pixels plus the cached ViT output of their image (``vision_embeds``)."""

    def __init__(self, pairs: PairDataset, cache: Any) -> None:
        self.pairs, self.cache = pairs, cache
        self.num_images = pairs.num_images

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.pairs[index]
        sample["vision_embeds"] = self.cache.get(sample["key"])
        return sample


def _cached_dataset(cfg, ctx, blip2: Blip2, sources, text_processor, info) -> _CachedPairs:
    from vlkit.training.feature_cache import FeatureCache, fingerprint_module, transform_signature

    pairs = PairDataset([(a, r, None) for a, r, _ in sources], text_processor, with_images=False)
    processor = sources[0][2]
    signature = transform_signature(processor)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(ctx.precision)
    cache = FeatureCache(
        resolve_path(cfg.feature_cache, cfg.data_root),
        encoder_fingerprint=fingerprint_module(blip2.vision, extra=f"autocast={ctx.precision}"),
        transform_signature=signature,
    )
    keys = [pairs.key(p) for p in pairs.pairs]
    computed = cache.fill(
        keys,
        load=lambda key: processor(pairs.decode(key)),
        encode=blip2.vision.to(ctx.device),
        device=ctx.device,
        autocast_dtype=autocast,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    info["feature cache"] = f"{cache.dir} ({computed} computed, {len(set(keys)) - computed} cached)"
    return _CachedPairs(pairs, cache)


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


def _evaluator(cfg: Stage1Config, ctx: TaskContext, tokenizer: Any, size: int):
    from vlkit.data.datasets import ImageFolderDataset, RetrievalDataset
    from vlkit.metrics.retrieval import retrieval_recall

    processor = make_image_processor("blip_image_eval", size)
    text_processor = BlipCaptionProcessor(max_words=cfg.max_words)
    device = ctx.device

    def encode_texts(net: Stage1Model, texts: list[str], batch_size: int) -> Tensor:
        feats = []
        for start in range(0, len(texts), batch_size):
            ids, mask = tokenizer(
                texts[start : start + batch_size], padding="max_length", max_length=cfg.max_txt_len, truncation=True
            )
            feats.append(net("text", text_ids=ids.to(device), text_mask=mask.to(device)).float())
        return torch.cat(feats)

    def encode_images(net: Stage1Model, dataset: Any, indices: list[int], batch_size: int) -> Tensor:
        feats = []
        for start in range(0, len(indices), batch_size):
            pixels = torch.stack([dataset[i].image for i in indices[start : start + batch_size]]).to(device)
            feats.append(net("image", pixel_values=pixels).float())
        return torch.cat(feats)

    retrieval = None
    if cfg.val is not None:
        val = cfg.val
        ds = RetrievalDataset(
            resolve_path(val.annotations, cfg.data_root),
            resolve_path(val.images, cfg.data_root),
            processor,
            text_processor,
        )
        if not ds.is_eval:
            raise ConfigError(f"task.val.annotations: {val.annotations} is not an eval-format caption file")
        n_images = len(ds.image) if val.max_images is None else min(val.max_images, len(ds.image))
        text_index = [t for i in range(n_images) for t in ds.img2txt[i]]
        position = {t: k for k, t in enumerate(text_index)}
        img2txt = [[position[t] for t in ds.img2txt[i]] for i in range(n_images)]
        txt2img = [ds.txt2img[t] for t in text_index]
        retrieval = (ds, n_images, [ds.text[t] for t in text_index], img2txt, txt2img)

    classification = None
    if cfg.classification is not None:
        c = cfg.classification
        ds_c = ImageFolderDataset(
            resolve_path(c.root, cfg.data_root), processor, labels_file=resolve_path(c.labels, cfg.data_root)
        )
        n = len(ds_c) if c.max_images is None else min(c.max_images, len(ds_c))
        prompts = [c.template.format(name) for name in ds_c.classes]
        classification = (ds_c, n, prompts)

    def evaluate(net: Stage1Model) -> dict[str, float]:
        out: dict[str, float] = {}
        if retrieval is not None:
            ds, n_images, texts, img2txt, txt2img = retrieval
            image_feats = encode_images(net, ds, list(range(n_images)), cfg.val.batch_size)  # (N, Q, E)
            text_feats = encode_texts(net, texts, cfg.val.batch_size)  # (T, E)
            sim = losses.itc_similarity(image_feats, text_feats)  # (N, T)
            metrics = retrieval_recall(sim.float().cpu().numpy(), img2txt, txt2img)
            out |= {f"itc_{k}": v for k, v in metrics.items() if k != "agg_metrics"}
        if classification is not None:
            ds_c, n, prompts = classification
            image_feats = encode_images(net, ds_c, list(range(n)), 64)
            text_feats = encode_texts(net, prompts, 64)
            predicted = losses.itc_similarity(image_feats, text_feats).argmax(dim=1).cpu()
            labels = torch.tensor([ds_c.samples[i][1] for i in range(n)])
            out["zs_top1"] = 100.0 * float((predicted == labels).float().mean())
        return out

    return evaluate
