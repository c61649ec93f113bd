"""VLMo fine-tuning tasks: VQA (``vlmo_vqa``), image-text retrieval (``vlmo_retrieval``) and NLVR2 (``vlmo_nlvr2``).

Each follows the reference objective (vlmo-spec §A.5):

* VQA — the answer classifier on the fusion CLS feature, trained with binary cross-entropy against the soft
  scores, averaged over every (sample, answer) element and multiplied by the number of answers (ban-vqa's
  convention, :func:`vqa_loss`). The classifier's learning-rate multiplier (20 in the reference) is the
  recipe's ``optim.lr_mult: {vqa_head: 20}``.
* Retrieval — the dual encoder's contrastive loss over the batch gathered from every process, the local
  features first (:func:`contrastive_loss`); optionally ITM with one hard negative image per text and one
  hard negative text per image drawn from those similarities (:func:`itm_hard_negatives`), as in the
  reference's pre-training.
* NLVR2 — the statement fused with each image (modality types 1 and 2), the two CLS features concatenated
  into the 2-way classifier, cross-entropy.

The model starts from a unilm checkpoint (``.pt``/``.ckpt``, resized to the recipe's resolution), a vlkit
folder, or a preset initialised from scratch. Data come from ViLT arrow tables or vlkit's JSON formats
(:mod:`vlkit.data.vlmo`). At the end of a run the model is exported as a vlkit folder with its tokenizer
(``tokenizer/vocab.txt``) and, for VQA, its answer vocabulary (``answer2label.txt``), which
:func:`vlkit.evaluation.vlmo.evaluate_vlmo` and :func:`vlkit.checkpoints.folder.load_model` read back.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit import distributed
from vlkit.config import from_dict, to_dict
from vlkit.data.vlmo import (
    NLVR2Collator,
    NLVR2Source,
    RetrievalCollator,
    RetrievalSource,
    VQACollator,
    VQASource,
    dataset_texts,
)
from vlkit.data.vlmo_text import VLMoTokenizer, train_wordpiece
from vlkit.data.vqa_vocab import VQAVocab, build_vqa_vocab
from vlkit.errors import ConfigError, DataError
from vlkit.layers.pos_embed import init_sincos_
from vlkit.models.vlmo import MultiwayBlock, VLMo, VLMoConfig
from vlkit.processors import HALF_MEAN, HALF_STD, ImageTrainProcessor, RandAugment, make_image_processor
from vlkit.training.task import TaskContext, TaskState

ANSWERS_FILE = "answer2label.txt"  # the inference guide's name for the label file (JSON lines)
TOKENIZER_DIR = "tokenizer"

# The reference's ``square_transform_randaug`` RandomAugment op list, in its order (the draw picks by index).
VLMO_RANDAUG_OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)

GatherFn = Callable[[Tensor], Tensor]

# ------------------------------------------------------------------------------------------------- configs


@dataclass
class VLMoModelSpec:
    """Which model a VLMo task fine-tunes.

    Attributes:
        preset: architecture of a model trained from scratch (``VLMO_PRESETS``: base, large, base_plus, tiny);
            ignored when ``checkpoint`` is set.
        checkpoint: pretrained or fine-tuned weights: a unilm ``.pt``/``.ckpt`` file or a vlkit folder. Its
            architecture is read from the file; task heads it lacks are freshly initialised, heads the task
            does not use are dropped, and the relative position table is resampled when ``config`` changes
            the image size (the reference loader's behaviour).
        config: ``VLMoConfig`` fields to set (``image_size``, ``drop_path_rate``, ``max_text_len``, sizes of a
            from-scratch model...). ``heads``, ``vqa_num_labels`` and, from scratch, ``vocab_size`` follow
            the task and its tokenizer.
        init_std: from scratch only: the std of the initial linear weights of the blocks, the pooler and the
            heads (None: the reference's 0.02). 0.02 suits the reference's width (768); a narrow model's
            attention logits then start near zero and it learns to attend to the image slowly, so a tiny model
            trained from scratch learns much faster with a larger value (about 0.02 * sqrt(768 / hidden)).
        pos_init: from scratch with ``position: absolute`` only: ``normal`` (the reference, std 0.02) or
            ``sincos``, the image position embedding starting from fixed 2-D sine-cosine vectors
            (:func:`vlkit.layers.pos_embed.sincos_2d`; the CLS entry zero) and learned from there. The keys
            and shapes stay the reference's.
    """

    preset: str = "base"
    checkpoint: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    init_std: float | None = None
    pos_init: Literal["normal", "sincos"] = "normal"

    def __post_init__(self) -> None:
        for key in ("heads", "vqa_num_labels"):
            if key in self.config:
                raise ConfigError(f"model.config.{key} is set by the task, not the recipe")
        if self.init_std is not None and (self.checkpoint is not None or self.init_std <= 0):
            raise ConfigError("model.init_std must be positive and applies to models from scratch only")
        if self.pos_init != "normal" and self.checkpoint is not None:
            raise ConfigError("model.pos_init applies to models from scratch only")


@dataclass
class _Common:
    """Fields shared by the three tasks (see the task configs)."""

    model: VLMoModelSpec = field(default_factory=VLMoModelSpec)
    data_root: Path | None = None
    models_root: Path | None = None
    tokenizer: str = "bert-base-uncased"
    tokenizer_vocab_size: int = 1000
    train_transform: Literal["vlmo_train", "vlmo_eval"] = "vlmo_train"
    eval_batch_size: int = 64
    export: bool = True

    def _check_common(self) -> None:
        if self.eval_batch_size < 1:
            raise ConfigError("eval_batch_size must be >= 1")
        if self.tokenizer_vocab_size < 16:
            raise ConfigError("tokenizer_vocab_size must be >= 16")


@dataclass
class VLMoVQAConfig(_Common):
    """Recipe section of ``vlmo_vqa``.

    Attributes:
        model: what to fine-tune (:class:`VLMoModelSpec`).
        data_root: folder that relative data paths (and a relative ``tokenizer`` path) are relative to.
        models_root: folder that a relative ``model.checkpoint`` is relative to (e.g. the ``runs/`` folder of
            an earlier recipe whose ``RUN/model`` this one starts from); unset: the working directory.
        data: the training split (:class:`vlkit.data.vlmo.VQASource`).
        val: the split evaluated during training (None: no evaluation).
        answers: answer label file (``answer2label.txt`` JSON lines, an id2label JSON, a list...). Default:
            built from the training annotations (JSON) as the reference does, or read back from the arrow
            tables' ``answers``/``answer_labels`` columns.
        answer_min_count: occurrences a normalised answer needs to enter a vocabulary built here (9 in the
            reference, over VQAv2 train + val).
        answer_annotations: annotation files to build the vocabulary from (default: the training ones).
        tokenizer: "bert-base-uncased" (found offline), a ``vocab.txt`` or a folder holding one (e.g. the
            shapes tokenizer from ``vlkit data tokenizers``), or "train" to train a WordPiece vocabulary of
            at most ``tokenizer_vocab_size`` tokens on the training questions (models from scratch only).
        train_transform: "vlmo_train" (RandomResizedCrop, flip, RandAugment as the reference) or "vlmo_eval"
            (plain resize; for data where a flip changes the answer, such as left/right questions).
        eval_batch_size: batch size of the evaluation during training.
        export: write the final model as a vlkit folder to ``RUN/model``.
    """

    data: VQASource = field(default_factory=lambda: VQASource(arrow=[Path("vqav2_train.arrow")]))
    val: VQASource | None = None
    answers: Path | None = None
    answer_min_count: int = 9
    answer_annotations: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._check_common()
        if self.answer_min_count < 1:
            raise ConfigError("answer_min_count must be >= 1")


@dataclass
class VLMoRetrievalConfig(_Common):
    """Recipe section of ``vlmo_retrieval`` (fields as in :class:`VLMoVQAConfig`, plus):

    Attributes:
        data: training pairs (:class:`vlkit.data.vlmo.RetrievalSource`).
        val: the gallery evaluated during training (recall of the dual encoder).
        itm: add the ITM loss with hard negatives (the model gets an ITM head); the reference's retrieval
            fine-tuning uses the contrastive loss only.
        itm_rerank_k: evaluation during training re-ranks the top k candidates with the ITM head (0: off).
        mlm: add masked language modelling on the fusion pass (the model gets an MLM head), as in the
            reference's pre-training: ``mlm_probability`` of the real tokens (never [CLS]/[SEP]/[PAD]) are
            predicted, of which 80 % are replaced by [MASK], 10 % by a random token and 10 % kept.
        mlm_probability: the masking rate (0.15 in the reference).
    """

    data: RetrievalSource = field(default_factory=lambda: RetrievalSource(arrow=[Path("f30k_train.arrow")]))
    val: RetrievalSource | None = None
    itm: bool = False
    itm_rerank_k: int = 0
    mlm: bool = False
    mlm_probability: float = 0.15

    def __post_init__(self) -> None:
        self._check_common()
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if self.itm_rerank_k < 0:
            raise ConfigError("itm_rerank_k must be >= 0")
        if self.itm_rerank_k and not self.itm:
            raise ConfigError("itm_rerank_k needs itm: true (the ITM head)")


@dataclass
class VLMoNLVR2Config(_Common):
    """Recipe section of ``vlmo_nlvr2`` (fields as in :class:`VLMoVQAConfig`, plus ``data``/``val``:
    :class:`vlkit.data.vlmo.NLVR2Source`)."""

    data: NLVR2Source = field(default_factory=lambda: NLVR2Source(arrow=[Path("nlvr2_train.arrow")]))
    val: NLVR2Source | None = None

    def __post_init__(self) -> None:
        self._check_common()


# -------------------------------------------------------------------------------------------------- losses


def vqa_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """The reference VQA loss: BCE-with-logits over all (sample, answer) pairs, times the number of answers.

    Equal to the per-sample sum over answers, averaged over the batch.

    Args:
        logits: (B, C) classifier output.
        targets: (B, C) soft scores in [0, 1].

    Returns:
        () loss, computed in fp32.
    """
    if logits.shape != targets.shape or logits.dim() != 2:
        raise DataError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both be (B, C)")
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]


def gather_local_first(t: Tensor, *, rank: int | None = None, gather: GatherFn | None = None) -> Tensor:
    """All ranks' ``t`` concatenated with this rank's rows first (keeping their gradient), then the other
    ranks' rows in rank order as constants — the order the reference builds its contrastive matrices in.

    Args:
        t: (B, ...) local tensor.
        rank: this process's rank (from the process group when None).
        gather: no-grad all-gather in rank order (default :func:`vlkit.distributed.all_gather_no_grad`).

    Returns:
        (B·W, ...).
    """
    gather = gather or distributed.all_gather_no_grad
    rank = distributed.rank() if rank is None else rank
    everything = gather(t)
    b = t.shape[0]
    if everything.shape[0] == b:
        return t
    return torch.cat([t, everything[: rank * b], everything[(rank + 1) * b :]], dim=0)


@dataclass
class ContrastiveOutput:
    """Result of :func:`contrastive_loss`.

    Attributes:
        loss: () mean of the image->text and text->image cross-entropies.
        logits_per_image: (B·W, B·W) ``exp(logit_scale) * image · text``, local rows and columns first.
        logits_per_text: its transpose.
    """

    loss: Tensor
    logits_per_image: Tensor
    logits_per_text: Tensor


def contrastive_loss(
    image_feats: Tensor,
    text_feats: Tensor,
    logit_scale: Tensor,
    *,
    rank: int | None = None,
    gather: GatherFn | None = None,
) -> ContrastiveOutput:
    """The reference's image-text contrastive loss (``compute_irtr``; ``compute_itc`` for one feature pair).

    Features of every process are gathered (the local ones first, with gradient; the others constant) and
    the full (B·W, B·W) matrix is scored on every process; sample ``i``'s positive is column ``i``. The
    temperature is ``exp(logit_scale)``, unclamped.

    Args:
        image_feats: (B, E) L2-normalised image features.
        text_feats: (B, E) L2-normalised text features.
        logit_scale: () learnable log scale.
        rank: this process's rank (from the process group when None).
        gather: no-grad all-gather (default :func:`vlkit.distributed.all_gather_no_grad`).

    Returns:
        :class:`ContrastiveOutput`.
    """
    if image_feats.shape != text_feats.shape or image_feats.dim() != 2:
        raise DataError(f"image {tuple(image_feats.shape)} and text {tuple(text_feats.shape)} features must be (B, E)")
    all_images = gather_local_first(image_feats, rank=rank, gather=gather)  # (B·W, E)
    all_texts = gather_local_first(text_feats, rank=rank, gather=gather)  # (B·W, E)
    logits_per_image = logit_scale.exp() * all_images @ all_texts.t()  # (B·W, B·W)
    logits_per_text = logits_per_image.t()
    target = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    loss = (F.cross_entropy(logits_per_image.float(), target) + F.cross_entropy(logits_per_text.float(), target)) / 2
    return ContrastiveOutput(loss, logits_per_image, logits_per_text)


@torch.no_grad()
def itm_hard_negatives(
    logits_per_image: Tensor, logits_per_text: Tensor, batch: int, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """The reference's hard-negative draw for ITM (``compute_itm_hardneg``).

    Rows of the local samples are soft-maxed (fp32), the positive (the diagonal entry) set to 0, and one
    column drawn per row: a negative image for each local text, a negative text for each local image.

    Args:
        logits_per_image: (B·W, B·W) from :func:`contrastive_loss` (local rows first).
        logits_per_text: its transpose.
        batch: B, the local batch size.
        generator: random generator (on the logits' device) for reproducible draws.

    Returns:
        ``(image_index, text_index)``: (B,) long indices into the local-first gathered images / texts.
    """
    weights_i2t = F.softmax(logits_per_image[:batch].float(), dim=1)
    weights_t2i = F.softmax(logits_per_text[:batch].float(), dim=1)
    weights_i2t.fill_diagonal_(0)
    weights_t2i.fill_diagonal_(0)
    image_index = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    text_index = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    return image_index, text_index


def mask_tokens(
    ids: Tensor,
    keep: Tensor,
    *,
    mask_id: int,
    special_ids: Sequence[int],
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking for MLM (the reference's ``DataCollatorForLanguageModeling`` rule): each real, non-special
    token is picked with ``probability``; a picked token becomes ``mask_id`` (80 %), a random token (10 %) or
    stays (10 %). A text with no pick gets its first eligible token picked, so every text has a target.

    Args:
        ids: (B, L) token ids.
        keep: (B, L) bool, True for real tokens.
        mask_id: the [MASK] id.
        special_ids: ids never picked ([CLS], [SEP], [PAD]...).
        vocab_size: random replacements are drawn from ``0..vocab_size-1``.
        probability: the picking rate.
        generator: random generator on ``ids``' device.

    Returns:
        ``(masked_ids, labels)``: (B, L) ids to feed, (B, L) targets with -100 where nothing is predicted.
    """
    eligible = keep.bool() & ~torch.isin(ids, torch.tensor(list(special_ids), device=ids.device))
    draw = torch.rand(ids.shape, device=ids.device, generator=generator)
    picked = eligible & (draw < probability)
    first = eligible & (eligible.cumsum(dim=1) == 1)
    picked |= first & ~picked.any(dim=1, keepdim=True)
    how = torch.rand(ids.shape, device=ids.device, generator=generator)
    random_ids = torch.randint(vocab_size, ids.shape, device=ids.device, generator=generator)
    masked = torch.where(picked & (how < 0.8), torch.full_like(ids, mask_id), ids)
    masked = torch.where(picked & (how >= 0.8) & (how < 0.9), random_ids, masked)
    labels = torch.where(picked, ids, torch.full_like(ids, -100))
    return masked, labels


def nlvr2_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over the two NLVR2 classes (fp32)."""
    return F.cross_entropy(logits.float(), labels)


# ------------------------------------------------------------------------------------------------- building


def _read_source(checkpoint: Path) -> tuple[dict[str, Tensor], dict[str, Any], Literal["unilm", "vlkit"]]:
    """(state dict, config fields, key layout) of a unilm file or of a vlkit VLMo folder."""
    from vlkit.checkpoints import folder, unilm

    if checkpoint.is_dir():
        model = folder.load_folder(checkpoint)
        if not isinstance(model, VLMo):
            raise ConfigError(f"{checkpoint}: holds a {type(model).__name__}, not a VLMo")
        return model.state_dict(), to_dict(model.config), "vlkit"
    sd = unilm.read_unilm_state_dict(checkpoint)
    return sd, to_dict(unilm.infer_unilm_config(sd, source=str(checkpoint))), "unilm"


def build_model(
    spec: VLMoModelSpec, heads: Sequence[str], *, vqa_num_labels: int | None = None, vocab_size: int | None = None
) -> VLMo:
    """Build the model a task trains (see :class:`VLMoModelSpec`).

    Args:
        spec: the recipe's model section.
        heads: the heads the task needs (e.g. ``("vqa",)``).
        vqa_num_labels: size of the VQA classifier.
        vocab_size: text vocabulary of a model from scratch (the tokenizer's size).

    Returns:
        The model in train mode, on the CPU.
    """
    from vlkit.checkpoints import unilm

    overrides: dict[str, Any] = dict(spec.config)
    overrides["heads"] = tuple(heads)
    if vqa_num_labels is not None:
        overrides["vqa_num_labels"] = vqa_num_labels
    if spec.checkpoint is None:
        if vocab_size is not None:
            overrides.setdefault("vocab_size", vocab_size)
        model = VLMo(VLMoConfig.preset(spec.preset, **overrides))
        if spec.init_std is not None:
            reinit_linears(model, spec.init_std)
        if spec.pos_init == "sincos":
            init_sincos_positions(model)
        return model.train()
    sd, fields, layout = _read_source(spec.checkpoint)
    file_heads = set(fields["heads"])
    model = VLMo(from_dict(VLMoConfig, {**fields, **overrides}, path="model.config"))
    init, drop = set(heads) - file_heads, file_heads - set(heads)
    unilm.load_unilm(model, sd, init_heads=init, drop_heads=drop, layout=layout)
    return model.train()


@torch.no_grad()
def reinit_linears(model: VLMo, std: float) -> None:
    """Draw the linear weights of the blocks (truncated normal, as the reference) and of the pooler and heads
    (normal) with ``std`` instead of 0.02; biases, norms, embeddings and the patch projection keep the
    reference initialisation. See :attr:`VLMoModelSpec.init_std`."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name.startswith("blocks."):
            nn.init.trunc_normal_(module.weight, std=std)  # bounds +-2 (absolute), as the reference
        else:
            nn.init.normal_(module.weight, std=std)


def init_sincos_positions(model: VLMo) -> None:
    """Set the image position embedding to 2-D sine-cosine vectors (CLS entry zero). See ``pos_init``."""
    if model.pos_embed is None:
        raise ConfigError("model.pos_init: sincos needs config.position: absolute (this model has relative bias)")
    init_sincos_(model.pos_embed, source="VLMo pos_embed")


def build_tokenizer(spec: str, *, texts: Callable[[], list[str]], out_dir: Path, size: int) -> Path:
    """Resolve the recipe's ``tokenizer`` to a ``vocab.txt`` folder or file ("train": train one of at most
    ``size`` tokens on ``texts()`` into ``out_dir``)."""
    if spec == "train":
        return train_wordpiece(texts(), out_dir, vocab_size=size)
    from vlkit.data.vlmo_text import resolve_vocab

    return resolve_vocab(spec)


def image_processors(config: VLMoConfig, train_transform: str) -> tuple[Any, Any]:
    """(train, eval) image processors at the model's resolution with VLMo's 0.5/0.5 normalisation."""
    size = config.image_size
    eval_processor = make_image_processor("vlmo_eval", size)
    if train_transform == "vlmo_eval":
        return eval_processor, eval_processor
    train = ImageTrainProcessor(size, HALF_MEAN, HALF_STD, randaugment=RandAugment(2, 7, ops=VLMO_RANDAUG_OPS))
    return train, eval_processor


def export_folder(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    folder: Path,
    *,
    tokenizer: VLMoTokenizer,
    vocab: VQAVocab | None = None,
    source: str | None = None,
) -> Path:
    """Write a VLMo as a vlkit folder (config.yaml + model.safetensors) with ``tokenizer/vocab.txt`` and, for
    VQA, ``answer2label.txt``.

    Args:
        model: the trained model (its config is written; it may be sharded).
        state_dict: its complete state as CPU tensors (written as the weights).
        folder: destination folder.
        tokenizer: the tokenizer it was trained with.
        vocab: the answer vocabulary of a VQA model.
        source: provenance for config.yaml.
    """
    import yaml

    from vlkit.checkpoints.folder import CONFIG_FILE, WEIGHTS_FILE
    from vlkit.checkpoints.io import save_safetensors

    if not isinstance(model, VLMo):
        raise ConfigError(f"export_folder expects a VLMo, got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_safetensors(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt", "arch": "vlmo"})
    meta: dict[str, Any] = {"arch": "vlmo", "config": to_dict(model.config)}
    if source is not None:
        meta["source"] = source
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(meta, sort_keys=False), encoding="utf-8")
    tokenizer.save(folder / TOKENIZER_DIR)
    if vocab is not None:
        vocab.save(folder / ANSWERS_FILE)
    return folder


def folder_tokenizer(path: str | os.PathLike, max_length: int) -> VLMoTokenizer:
    """The tokenizer saved beside an exported model, or bert-base-uncased when the folder has none."""
    saved = Path(path) / TOKENIZER_DIR
    return VLMoTokenizer(saved if (saved / "vocab.txt").is_file() else None, max_length)


def _vqa_vocab(cfg: VLMoVQAConfig) -> VQAVocab:
    if cfg.answers is not None:
        return VQAVocab.load(cfg.answers)
    if cfg.answer_annotations:
        return build_vqa_vocab(cfg.answer_annotations, min_count=cfg.answer_min_count)
    if cfg.data.arrow:
        from vlkit.data.arrow import arrow_vqa_vocab

        return arrow_vqa_vocab(cfg.data.arrow)
    if not cfg.data.annotations:
        raise ConfigError("task.data has no annotations to build the answer vocabulary from; set task.answers")
    return build_vqa_vocab(cfg.data.annotations, min_count=cfg.answer_min_count)


def _info(model: VLMo, tokenizer: VLMoTokenizer, spec: VLMoModelSpec) -> dict[str, Any]:
    c = model.config
    return {
        "model": f"{spec.checkpoint or 'preset ' + spec.preset}: hidden {c.hidden_size}, depth {c.depth}, "
        f"{c.image_size} px, text {c.max_text_len}, heads {', '.join(c.heads)}",
        "tokenizer": f"{tokenizer.vocab_file} ({tokenizer.vocab_size} tokens)",
    }


def _check_vocab(model: VLMo, tokenizer: VLMoTokenizer) -> None:
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
            f"{model.config.vocab_size}; use the tokenizer the model was trained with"
        )


def resolve_paths(cfg: Any) -> Any:
    """A copy of a task config with its data paths (and a tokenizer path) taken relative to ``data_root``, and a
    relative ``model.checkpoint`` relative to ``models_root``."""
    if cfg.models_root is not None and cfg.model.checkpoint is not None and not cfg.model.checkpoint.is_absolute():
        model = dataclasses.replace(cfg.model, checkpoint=cfg.models_root / cfg.model.checkpoint)
        cfg = dataclasses.replace(cfg, model=model, models_root=None)
    root = cfg.data_root
    if root is None:
        return cfg
    changes: dict[str, Any] = {"data_root": None, "data": cfg.data.with_root(root)}
    if cfg.val is not None:
        changes["val"] = cfg.val.with_root(root)
    if cfg.tokenizer not in ("bert-base-uncased", "train"):
        changes["tokenizer"] = str(root / cfg.tokenizer)
    if isinstance(cfg, VLMoVQAConfig):
        changes["answers"] = None if cfg.answers is None else root / cfg.answers
        changes["answer_annotations"] = [root / p for p in cfg.answer_annotations]
    return dataclasses.replace(cfg, **changes)


def build(cfg: VLMoVQAConfig | VLMoRetrievalConfig | VLMoNLVR2Config, ctx: TaskContext) -> TaskState:
    """Build one of the VLMo tasks (see :mod:`vlkit.training.task` for the contract)."""
    cfg = resolve_paths(cfg)
    if isinstance(cfg, VLMoVQAConfig):
        return _build_vqa(cfg, ctx)
    if isinstance(cfg, VLMoRetrievalConfig):
        return _build_retrieval(cfg, ctx)
    if isinstance(cfg, VLMoNLVR2Config):
        return _build_nlvr2(cfg, ctx)
    raise ConfigError(f"vlkit.tasks.vlmo: unsupported config {type(cfg).__name__}")


def _tokenizer_and_model(
    cfg: _Common, ctx: TaskContext, heads: Sequence[str], texts: Callable[[], list[str]], **kwargs: Any
) -> tuple[VLMoTokenizer, VLMo]:
    if cfg.tokenizer == "train" and cfg.model.checkpoint is not None:
        raise ConfigError("tokenizer: train builds a new vocabulary, which only a model from scratch can use")
    vocab_path = build_tokenizer(
        cfg.tokenizer, texts=texts, out_dir=ctx.output_dir / TOKENIZER_DIR, size=cfg.tokenizer_vocab_size
    )
    vocab_size = VLMoTokenizer(vocab_path).vocab_size  # the text length is known once the model is built
    model = build_model(cfg.model, heads, vocab_size=vocab_size, **kwargs)
    tokenizer = VLMoTokenizer(vocab_path, model.config.max_text_len)
    _check_vocab(model, tokenizer)
    return tokenizer, model


def _build_vqa(cfg: VLMoVQAConfig, ctx: TaskContext) -> TaskState:
    from vlkit.evaluation.vlmo import evaluate_vqa

    vocab = _vqa_vocab(cfg)
    # Build the datasets once the image size is known; the tokenizer may need the training questions first.
    train_source = cfg.data

    def questions() -> list[str]:
        return dataset_texts(train_source.open(vocab, None, drop_unanswerable=True))

    tokenizer, model = _tokenizer_and_model(cfg, ctx, ("vqa",), questions, vqa_num_labels=len(vocab))
    train_tf, eval_tf = image_processors(model.config, cfg.train_transform)
    train_set = train_source.open(vocab, train_tf, drop_unanswerable=True)
    collate = VQACollator(tokenizer, len(vocab))

    def training_step(net: VLMo, batch: dict) -> dict[str, Tensor]:
        logits = net(batch["text_ids"], batch["text_mask"], batch["image"], head="vqa")
        loss = vqa_loss(logits, batch["targets"])
        # the reference's VQAScore: the soft score of the arg-max answer
        score = batch["targets"].gather(1, logits.argmax(dim=1, keepdim=True)).mean()
        return {"loss": loss, "vqa_score": score.detach()}

    evaluate = best = None
    if cfg.val is not None:
        val_set = cfg.val.open(vocab, eval_tf)
        annotations = cfg.val.annotations

        def evaluate(net: VLMo) -> dict[str, float]:
            result = evaluate_vqa(
                net,
                val_set,
                tokenizer,
                vocab,
                annotations=annotations,
                batch_size=cfg.eval_batch_size,
                progress=False,
            )
            return {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}

        best = "vqa_accuracy" if annotations else "vqa_score"

    def export(net: nn.Module, state: Mapping[str, Tensor], folder: Path) -> None:
        export_folder(net, state, folder, tokenizer=tokenizer, vocab=vocab, source=f"vlkit train ({ctx.output_dir})")

    info = _info(model, tokenizer, cfg.model)
    info["answers"] = f"{len(vocab)} ({cfg.answers or 'built from the training data'})"
    info["training questions"] = len(train_set)
    return _state(cfg, model, train_set, training_step, collate, evaluate, best, export if cfg.export else None, info)


def _build_nlvr2(cfg: VLMoNLVR2Config, ctx: TaskContext) -> TaskState:
    from vlkit.evaluation.vlmo import evaluate_nlvr2

    tokenizer, model = _tokenizer_and_model(cfg, ctx, ("nlvr2",), lambda: dataset_texts(cfg.data.open(None)))
    train_tf, eval_tf = image_processors(model.config, cfg.train_transform)
    train_set = cfg.data.open(train_tf)

    def training_step(net: VLMo, batch: dict) -> dict[str, Tensor]:
        logits = net(batch["text_ids"], batch["text_mask"], batch["image_0"], head="nlvr2", image_1=batch["image_1"])
        accuracy = (logits.argmax(dim=1) == batch["labels"]).float().mean()
        return {"loss": nlvr2_loss(logits, batch["labels"]), "accuracy": accuracy.detach()}

    evaluate = best = None
    if cfg.val is not None:
        val_set = cfg.val.open(eval_tf)

        def evaluate(net: VLMo) -> dict[str, float]:
            return evaluate_nlvr2(net, val_set, tokenizer, batch_size=cfg.eval_batch_size, progress=False).metrics

        best = "accuracy"

    def export(net: nn.Module, state: Mapping[str, Tensor], folder: Path) -> None:
        export_folder(net, state, folder, tokenizer=tokenizer, source=f"vlkit train ({ctx.output_dir})")

    info = _info(model, tokenizer, cfg.model)
    info["training statements"] = len(train_set)
    return _state(
        cfg,
        model,
        train_set,
        training_step,
        NLVR2Collator(tokenizer),
        evaluate,
        best,
        export if cfg.export else None,
        info,
    )


def _build_retrieval(cfg: VLMoRetrievalConfig, ctx: TaskContext) -> TaskState:
    from vlkit.evaluation.vlmo import evaluate_retrieval

    heads = ("irtr",) + (("itm",) if cfg.itm else ()) + (("mlm",) if cfg.mlm else ())
    tokenizer, model = _tokenizer_and_model(cfg, ctx, heads, lambda: dataset_texts(cfg.data.open(None, train=True)))
    train_tf, eval_tf = image_processors(model.config, cfg.train_transform)
    train_set = cfg.data.open(train_tf, train=True)
    mask_id, special_ids = tokenizer.mask_token_id, tokenizer.special_ids

    def training_step(net: VLMo, batch: dict) -> dict[str, Tensor]:
        ids, mask, image = batch["text_ids"], batch["text_mask"], batch["image"]
        dual = net(ids, mask, image, head="contrastive")
        out = contrastive_loss(dual.image.cls_feats, dual.text.cls_feats, dual.logit_scale)
        losses = {"loss_irtr": out.loss, "logit_scale": dual.logit_scale.detach().exp()}
        total = out.loss
        if cfg.itm:
            b = ids.shape[0]
            image_index, text_index = itm_hard_negatives(out.logits_per_image, out.logits_per_text, b)
            with torch.no_grad():
                all_images = gather_local_first(image)
                all_ids, all_mask = gather_local_first(ids), gather_local_first(mask)
            logits = torch.cat(
                [
                    net(ids, mask, image, head="itm"),
                    net(ids, mask, all_images[image_index], head="itm"),
                    net(all_ids[text_index], all_mask[text_index], image, head="itm"),
                ]
            )
            labels = torch.zeros(3 * b, dtype=torch.long, device=logits.device)
            labels[:b] = 1
            loss_itm = F.cross_entropy(logits.float(), labels)
            losses["loss_itm"] = loss_itm
            total = total + loss_itm
        if cfg.mlm:
            masked, labels = mask_tokens(
                ids,
                mask.bool(),
                mask_id=mask_id,
                special_ids=special_ids,
                vocab_size=tokenizer.vocab_size,
                probability=cfg.mlm_probability,
            )
            logits = net(masked, mask, image, head="mlm")
            loss_mlm = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
            picked = labels != -100
            losses["loss_mlm"] = loss_mlm
            losses["mlm_accuracy"] = (logits.argmax(-1)[picked] == labels[picked]).float().mean().detach()
            total = total + loss_mlm
        losses["loss"] = total
        return losses

    evaluate = best = None
    if cfg.val is not None:
        val_set = cfg.val.open(eval_tf, train=False)

        def evaluate(net: VLMo) -> dict[str, float]:
            result = evaluate_retrieval(
                net,
                val_set,
                tokenizer,
                batch_size=cfg.eval_batch_size,
                itm_rerank_k=cfg.itm_rerank_k,
                progress=False,
            )
            return result.metrics

        best = "r_mean"

    def export(net: nn.Module, state: Mapping[str, Tensor], folder: Path) -> None:
        export_folder(net, state, folder, tokenizer=tokenizer, source=f"vlkit train ({ctx.output_dir})")

    info = _info(model, tokenizer, cfg.model)
    info["training pairs"] = len(train_set)
    return _state(
        cfg,
        model,
        train_set,
        training_step,
        RetrievalCollator(tokenizer),
        evaluate,
        best,
        export if cfg.export else None,
        info,
    )


def _state(
    cfg: _Common,
    model: VLMo,
    train_set: Any,
    training_step: Callable[[Any, Any], Mapping[str, Tensor]],
    collate: Callable[[list[Any]], Any],
    evaluate: Callable[[Any], Mapping[str, float]] | None,
    best: str | None,
    export: Callable[[nn.Module, Mapping[str, Tensor], Path], None] | None,
    info: dict[str, Any],
) -> TaskState:
    return TaskState(
        model=model,
        train_dataset=train_set,
        training_step=training_step,
        collate_fn=collate,
        evaluate=evaluate,
        best_metric=best,
        fsdp_units=(MultiwayBlock,),
        # Some parameters get no gradient from a task (the unused text-position table of relative models, the
        # VL experts and pooler in dual-encoder retrieval); DDP must not wait for them (Lightning's default).
        find_unused_parameters=True,
        deterministic_data=cfg.train_transform == "vlmo_eval",
        info=info,
        export=export,
    )


def config_from_dict(kind: str, data: Mapping[str, Any]) -> Any:
    """Type a task section (``kind``: vlmo_vqa / vlmo_retrieval / vlmo_nlvr2) — handy for tests and tools."""
    classes = {"vlmo_vqa": VLMoVQAConfig, "vlmo_retrieval": VLMoRetrievalConfig, "vlmo_nlvr2": VLMoNLVR2Config}
    if kind not in classes:
        raise ConfigError(f"unknown VLMo task {kind!r}; choose one of {', '.join(classes)}")
    return from_dict(classes[kind], data, path="task")
