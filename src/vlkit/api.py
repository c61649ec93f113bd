"""The Python API: ``vlkit.load(name_or_path)`` returns a :class:`Pipeline` that does the tasks its model can.

::

    import vlkit

    pipe = vlkit.load("shapes-blip2")                      # a bundled model, a vlkit folder, a transformers
    pipe.tasks                                              # folder or a LAVIS .pth
    # ('caption', 'answer', 'classify', 'retrieve', 'itm', 'embed')
    pipe.caption("cat.png")                                 # 'a cat on a sofa'
    pipe.caption(["a.png", "b.png"], num_beams=3)           # lists are batched: ['...', '...']
    pipe.answer("cat.png", "what color is the sofa?")       # 'red'
    pipe.classify("cat.png", ["cat", "dog"])                # [{'label': 'cat', 'score': 0.93}, ...]

Images may be paths, ``file://`` URLs, encoded bytes, binary file objects or PIL images (see
:func:`vlkit.data.images.load_image`; remote URLs are refused). A single image gives a single result, a list
gives a list. Which tasks a pipeline has follows from its model:

* a BLIP-2 with the stage-1 heads (ITC/ITM): ``classify``, ``retrieve``, ``itm``, ``embed_images`` /
  ``embed_texts``, and ``caption`` with the Q-Former's text decoder when it has the MLM head;
* a BLIP-2 with an LLM (stage 2): ``caption`` and ``answer`` (LLM captioning wins over the Q-Former's);
* InstructBLIP: ``caption``, ``answer`` and ``instruct``;
* VLMo with a VQA classifier and its answer list: ``answer``.

Asking for anything else raises :class:`UnsupportedTaskError`, which lists the tasks the model has (and why
a task is missing when a tokenizer or answer file is what it lacks).

Model names: ``vlkit.models()`` lists the bundled models (weights inside the package, ``vlkit/assets/NAME``)
and the real-size presets of :mod:`vlkit.zoo`, whose weights must be converted locally first
(``vlkit convert``); loading such a name without a converted folder says how.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vlkit.data.images import DEFAULT_MAX_PIXELS, ImageSource, load_image
from vlkit.errors import CheckpointError, ConfigError, DataError, VlkitError

__all__ = [
    "ASSETS_DIR",
    "BUNDLED",
    "DEFAULT_MODEL",
    "DEFAULT_INSTRUCT_MODEL",
    "TASKS",
    "ModelInfo",
    "Pipeline",
    "UnsupportedTaskError",
    "load",
    "models",
    "resolve_model",
]

Task = Literal["caption", "answer", "instruct", "classify", "retrieve", "itm", "embed"]
TASKS: tuple[str, ...] = ("caption", "answer", "instruct", "classify", "retrieve", "itm", "embed")

#: Where bundled model folders live inside the installed package.
ASSETS_DIR = Path(__file__).resolve().parent / "assets"

DEFAULT_MODEL = "shapes-blip2"
DEFAULT_INSTRUCT_MODEL = "shapes-instructblip"


@dataclass(frozen=True)
class _Bundled:
    arch: str
    description: str
    tasks: tuple[str, ...]


#: Models whose weights ship inside the package (trained by vlkit on the synthetic shapes world).
BUNDLED: dict[str, _Bundled] = {
    "shapes-blip2": _Bundled(
        "blip2",
        "small BLIP-2 trained on the shapes world: stage-1 heads, Q-Former captioner and a tiny OPT LLM",
        ("caption", "answer", "classify", "retrieve", "itm", "embed"),
    ),
    "shapes-instructblip": _Bundled(
        "instructblip",
        "small InstructBLIP trained on the shapes world with a tiny LLaMA LLM",
        ("caption", "answer", "instruct"),
    ),
    "shapes-vlmo": _Bundled("vlmo", "small VLMo VQA classifier trained on the shapes world", ("answer",)),
}

VLMO_TOKENIZER_DIR = "tokenizer"  # VLMo folders: the BERT vocab.txt it was trained with
VLMO_ANSWERS_FILE = "answer2label.txt"  # VLMo VQA folders: the classifier's answer list


class UnsupportedTaskError(VlkitError):
    """A task the loaded model cannot do."""


class ModelNotFoundError(CheckpointError):
    """A model name without local weights, or a path that does not exist."""


# ----------------------------------------------------------------------------------------------------------
# Names


@dataclass(frozen=True)
class ModelInfo:
    """One entry of :func:`models`.

    Attributes:
        name: what to pass to :func:`load`.
        arch: ``vlkit.models.ARCHS`` key.
        description: one line.
        tasks: the tasks a pipeline of this model has.
        available: whether :func:`load` works offline right now (bundled weights present).
        needs: what loading it takes ("bundled" or the conversion to run first).
    """

    name: str
    arch: str
    description: str
    tasks: tuple[str, ...]
    available: bool
    needs: str


def config_tasks(arch: str, config: Any) -> tuple[str, ...]:
    """The tasks a model of ``arch`` with ``config`` supports (given the tokenizers and answer file it needs)."""
    tasks: list[str] = []
    if arch == "vlmo":
        return ("answer",) if "vqa" in tuple(config.heads) else ()
    if config.lm is not None:
        tasks += ["caption", "answer"] + (["instruct"] if config.instruction_aware else [])
    elif config.qformer.lm_head:
        tasks.append("caption")
    if config.itc_itm_heads:
        tasks += ["classify", "retrieve", "itm", "embed"]
    return tuple(t for t in TASKS if t in tasks)


def _bundled_folder(name: str) -> Path | None:
    folder = ASSETS_DIR / name
    return folder if (folder / "config.yaml").is_file() else None


def _conversion_hint(name: str) -> str:
    from vlkit import zoo

    spec = zoo.MODELS[name]
    if spec.source == "none":
        return (
            f"{name} is an architecture preset without published weights: train one (vlkit train) or save a "
            "model with vlkit.checkpoints.folder.save_pretrained, then load that folder"
        )
    steps = []
    if spec.weights:
        cmd = f"vlkit convert {spec.weights[0]} OUT"
        if len(spec.weights) > 1:
            cmd += f" --vision {spec.weights[1]}"
        if spec.llm:
            cmd += f" --llm path/to/{spec.llm}"
        cmd += f" --preset {name}"
        steps.append(f"`{cmd}` ({spec.source} release files)")
    if spec.hf_id:
        steps.append(
            f"`vlkit convert path/to/{spec.hf_id.split('/')[-1]} OUT` (a local transformers folder of {spec.hf_id})"
        )
    if not steps:
        steps.append(f"convert its {spec.source} checkpoint into a vlkit folder OUT")
    return (
        f"{name} has no local weights (vlkit never downloads): convert them once with "
        + " or ".join(steps)
        + ", then vlkit.load('OUT')"
    )


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """The folder or file behind a model name or path.

    A bundled name resolves to its folder inside the package; any other known name (a real-size
    :mod:`vlkit.zoo` preset) needs converted weights, and resolving it raises with the command to run,
    unless a path of that name exists. Anything else is taken as a path.

    Raises:
        ModelNotFoundError: unknown name / missing path, or a known name without weights.
    """
    from vlkit import zoo

    text = os.fspath(name_or_path)
    path = Path(text)
    if text in BUNDLED or text in zoo.MODELS:
        folder = _bundled_folder(text)
        if folder is not None:
            return folder
        if path.exists():
            return path
        if text in BUNDLED:
            raise ModelNotFoundError(
                f"{text} is a bundled model but this installation has no {ASSETS_DIR / text}/ "
                "(reinstall vlkit with its package data, or pass the path of a model folder)"
            )
        raise ModelNotFoundError(_conversion_hint(text))
    if path.exists():
        return path
    known = sorted(set(BUNDLED) | set(zoo.MODELS))
    raise ModelNotFoundError(
        f"{text}: no such file or folder, and not a model name (see vlkit.models() / `vlkit models`: "
        f"{', '.join(known)})"
    )


def models() -> list[ModelInfo]:
    """Every model name :func:`load` knows: the bundled models first, then the :mod:`vlkit.zoo` presets.

    Returns:
        One :class:`ModelInfo` per name, saying which tasks it has and what loading it needs.
    """
    from vlkit import zoo

    out = []
    for name, entry in BUNDLED.items():
        folder = _bundled_folder(name)
        tasks = entry.tasks
        if folder is not None:
            from vlkit.checkpoints.folder import read_config

            arch, config = read_config(folder)
            tasks = config_tasks(arch, config)
        out.append(
            ModelInfo(
                name,
                entry.arch,
                entry.description,
                tasks,
                folder is not None,
                "bundled" if folder is not None else "bundled weights missing from this installation",
            )
        )
    for name, spec in zoo.MODELS.items():
        if name in BUNDLED:
            continue
        folder = _bundled_folder(name)
        needs = "bundled" if folder is not None else _needs(name)
        out.append(
            ModelInfo(
                name, spec.arch, spec.description, config_tasks(spec.arch, spec.config()), folder is not None, needs
            )
        )
    return out


def _needs(name: str) -> str:
    from vlkit import zoo

    spec = zoo.MODELS[name]
    if spec.source == "none":
        return "no published weights (train or save a folder)"
    parts = list(spec.weights) or [f"a {spec.source} checkpoint"]
    if spec.llm:
        parts.append(f"LLM folder {spec.llm}")
    alt = f" or transformers {spec.hf_id}" if spec.hf_id else ""
    return "vlkit convert: " + " + ".join(parts) + alt


# ----------------------------------------------------------------------------------------------------------
# Loading

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"``/``"bf16"``/... or a torch dtype -> torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of: float32, bfloat16, float16")
    return _DTYPES[dtype]


def parse_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (CUDA when available) or a torch device; None = CPU."""
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"bad device {device!r} ({err})") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but CUDA is not available here")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def load(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    answers: str | os.PathLike | None = None,
    **checkpoint_options: Any,
) -> Pipeline:
    """Load a model and return a :class:`Pipeline` with the tasks it supports.

    Args:
        name_or_path: a bundled model name (``vlkit.models()``), a vlkit folder, a transformers BLIP-2 /
            InstructBLIP folder or a LAVIS ``.pth``.
        device: "cpu", "cuda", "cuda:1", "auto" (CUDA when available); default CPU.
        dtype: "float32", "bfloat16", "float16" (default: as stored for a vlkit folder).
        max_pixels: refuse images larger than this (decompression bombs); None disables the check.
        answers: VLMo VQA only: the answer label file, when the model folder has no ``answer2label.txt``.
        checkpoint_options: passed to :func:`vlkit.checkpoints.folder.load_checkpoint` (``vision=``, ``llm=``,
            ``preset=``, ``drop_lm=``, ``qformer_tokenizer=`` for LAVIS / transformers sources).

    Returns:
        The pipeline.

    Raises:
        ModelNotFoundError: unknown name, missing path, or a preset whose weights are not converted yet.
        CheckpointError, ConfigError: a checkpoint that does not load.
    """
    from vlkit.checkpoints.folder import load_checkpoint

    path = resolve_model(name_or_path)
    loaded = load_checkpoint(path, device=parse_device(device), dtype=parse_dtype(dtype), **checkpoint_options)
    text_tokenizer, vqa_vocab = None, None
    from vlkit.models.vlmo import VLMo

    if isinstance(loaded.model, VLMo):
        text_tokenizer = _vlmo_tokenizer(path, loaded.model)
        answers_file = Path(answers) if answers is not None else path / VLMO_ANSWERS_FILE
        if answers_file.is_file():
            from vlkit.data.vqa_vocab import VQAVocab

            vqa_vocab = VQAVocab.load(answers_file)
        elif answers is not None:
            raise DataError(f"{answers}: no such answer label file")
    name = os.fspath(name_or_path)
    return Pipeline(
        loaded.model,
        llm_tokenizer=loaded.llm_tokenizer,
        qformer_tokenizer=loaded.qformer_tokenizer,
        text_tokenizer=text_tokenizer,
        vqa_vocab=vqa_vocab,
        name=name,
        max_pixels=max_pixels,
    )


def _vlmo_tokenizer(path: Path, model: nn.Module) -> Any:
    from vlkit.processors import find_bert_vocab

    vocab = path / VLMO_TOKENIZER_DIR / "vocab.txt" if path.is_dir() else None
    if vocab is None or not vocab.is_file():
        vocab = find_bert_vocab()
    if vocab is None:
        return None
    from vlkit.data.vlmo_text import VLMoTokenizer

    return VLMoTokenizer(vocab, model.config.max_text_len)


# ----------------------------------------------------------------------------------------------------------
# The pipeline


def _is_single(images: Any) -> bool:
    return not isinstance(images, (list, tuple))


def _as_list(items: Any, what: str) -> list[Any]:
    out = [items] if _is_single(items) else list(items)
    if not out:
        raise DataError(f"no {what} given")
    return out


def _texts(texts: str | Sequence[str], what: str) -> list[str]:
    out = [texts] if isinstance(texts, str) else list(texts)
    if not out:
        raise DataError(f"no {what} given")
    bad = [type(t).__name__ for t in out if not isinstance(t, str)]
    if bad:
        raise DataError(f"{what} must be strings, got {bad[0]}")
    return out


def _pairs(images: list[Any], texts: list[str], what: str) -> tuple[list[Any], list[str]]:
    """Pair images with texts: equal counts pair up, one of either is broadcast to the other's count."""
    if len(images) == len(texts):
        return images, texts
    if len(images) == 1:
        return images * len(texts), texts
    if len(texts) == 1:
        return images, texts * len(images)
    raise DataError(
        f"{len(images)} images but {len(texts)} {what}: give one per image, or one image or one {what[:-1]}"
    )


class Pipeline:
    """A loaded model with its tokenizers and image preprocessing, exposing the tasks the model supports.

    Build one with :func:`load`; the constructor is for models already in memory.

    Args:
        model: a ``Blip2``, ``InstructBlip`` or ``VLMo`` (put in eval mode here).
        llm_tokenizer: the LLM's transformers tokenizer (stage 2 / InstructBLIP).
        qformer_tokenizer: the Q-Former's :class:`~vlkit.processors.QFormerTokenizer` (stage-1 tasks,
            InstructBLIP); default for a stage-1 model: bert-base-uncased found offline, if it fits.
        text_tokenizer: VLMo: a callable texts -> (ids, mask) padded to ``max_text_len``.
        vqa_vocab: VLMo: the :class:`~vlkit.data.vqa_vocab.VQAVocab` of its classifier.
        name: how to call the model in messages and listings.
        max_pixels: largest accepted image (width * height); None = no limit.
        image_processor: callable PIL image -> (3, S, S) tensor (default: the model's eval transform).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        llm_tokenizer: Any = None,
        qformer_tokenizer: Any = None,
        text_tokenizer: Any = None,
        vqa_vocab: Any = None,
        name: str | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        image_processor: Any = None,
    ) -> None:
        from vlkit.models.blip2 import Blip2
        from vlkit.models.vlmo import VLMo

        if not isinstance(model, (Blip2, VLMo)):
            raise ConfigError(f"Pipeline needs a Blip2, InstructBlip or VLMo model, got {type(model).__name__}")
        self.model = model.eval()
        self.name = name or type(model).__name__
        self.max_pixels = max_pixels
        self.qformer_tokenizer = qformer_tokenizer
        self.text_tokenizer = text_tokenizer
        self.vqa_vocab = vqa_vocab
        self.processor = None  # LLMProcessor (stage 2 / InstructBLIP)
        self.missing: dict[str, str] = {}  # task -> why it is unavailable although the architecture has it
        self.arch = (
            "vlmo" if isinstance(model, VLMo) else ("instructblip" if model.config.instruction_aware else "blip2")
        )
        self._setup(llm_tokenizer, image_processor)

    # ------------------------------------------------------------------------------------------ set-up
    def _setup(self, llm_tokenizer: Any, image_processor: Any) -> None:
        from vlkit.processors import CLIP_MEAN, CLIP_STD, HALF_MEAN, HALF_STD, ImageEvalProcessor

        config = self.model.config
        wanted = config_tasks(self.arch, config)
        if self.arch == "vlmo":
            size, mean, std = config.image_size, HALF_MEAN, HALF_STD
            if "answer" in wanted and self.vqa_vocab is None:
                self.missing["answer"] = f"no answer list ({VLMO_ANSWERS_FILE} in the model folder, or answers=)"
            elif "answer" in wanted and len(self.vqa_vocab) != config.vqa_num_labels:
                raise ConfigError(
                    f"the answer list has {len(self.vqa_vocab)} answers but the VQA head {config.vqa_num_labels}"
                )
            if "answer" in wanted and self.text_tokenizer is None:
                self.missing["answer"] = f"no text tokenizer ({VLMO_TOKENIZER_DIR}/vocab.txt in the model folder)"
        else:
            size, mean, std = config.vision.image_size, CLIP_MEAN, CLIP_STD
            self._setup_blip2_text(llm_tokenizer, wanted)
        self.image_processor = image_processor or ImageEvalProcessor(size, mean, std)
        self.tasks: tuple[str, ...] = tuple(t for t in wanted if t not in self.missing)

    def _setup_blip2_text(self, llm_tokenizer: Any, wanted: tuple[str, ...]) -> None:
        config = self.model.config
        if self.qformer_tokenizer is None and (
            config.itc_itm_heads or config.instruction_aware or config.qformer.lm_head
        ):
            self.qformer_tokenizer = _default_qformer_tokenizer(config.qformer.vocab_size)
        no_qformer = "no Q-Former tokenizer (qformer_tokenizer/ in the model folder)"
        if config.itc_itm_heads and self.qformer_tokenizer is None:
            for task in ("classify", "retrieve", "itm", "embed"):
                self.missing[task] = no_qformer
        llm_problem = no_qformer  # why the LLM tasks are unavailable, if they are
        if config.lm is not None:
            if llm_tokenizer is None:
                llm_problem = "no LLM tokenizer (llm_tokenizer/ in the model folder)"
            elif not (config.instruction_aware and self.qformer_tokenizer is None):  # prompts also enter the Q-Former
                from vlkit.prompting import LLMProcessor

                self.processor = LLMProcessor(config, llm_tokenizer, self.qformer_tokenizer)
            if self.processor is None:
                for task in ("answer", "instruct"):
                    if task in wanted:
                        self.missing[task] = llm_problem
        if "caption" in wanted and self.processor is None and not self._qformer_captions():
            self.missing["caption"] = llm_problem

    def _qformer_captions(self) -> bool:
        """Whether the Q-Former's own text decoder can caption (a stage-1 MLM head and its tokenizer)."""
        config = self.model.config
        return bool(config.qformer.lm_head) and not config.instruction_aware and self.qformer_tokenizer is not None

    # ------------------------------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, arch={self.arch}, tasks={list(self.tasks)}, device={self.device})"

    def supports(self, task: str) -> bool:
        """Whether this pipeline can do ``task``."""
        return task in self.tasks

    def require(self, task: str) -> None:
        """Raise :class:`UnsupportedTaskError` unless the pipeline can do ``task``."""
        if task in self.tasks:
            return
        can = ", ".join(self.tasks) if self.tasks else "nothing"
        why = f" ({self.missing[task]})" if task in self.missing else ""
        raise UnsupportedTaskError(f"model {self.name} ({self.arch}) cannot do {task}{why}; it can do: {can}")

    def load_images(self, images: ImageSource | Sequence[ImageSource]) -> list[Any]:
        """Decode images (paths, ``file://`` URLs, bytes, file objects, PIL images) to RGB PIL images."""
        return [load_image(image, max_pixels=self.max_pixels) for image in _as_list(images, "images")]

    def pixels(self, images: ImageSource | Sequence[ImageSource]) -> Tensor:
        """(B, 3, S, S) preprocessed images on the model's device, in its dtype."""
        decoded = self.load_images(images)
        batch = torch.stack([self.image_processor(image) for image in decoded])
        return batch.to(device=self.device, dtype=self._vision_dtype())

    def _vision_dtype(self) -> torch.dtype:
        if self.arch == "vlmo":
            return self.dtype
        return next(self.model.vision.parameters()).dtype

    def generation_defaults(
        self, task: Literal["caption", "answer", "instruct"], *, decoder: Literal["auto", "llm", "qformer"] = "auto"
    ) -> Any:
        """The :class:`~vlkit.generation.GenerationConfig` a task decodes with when nothing is overridden
        (``decoder`` as in :meth:`caption`)."""
        self.require(task)
        if task != "caption" or self._caption_decoder(decoder):
            return self.processor.generation_config("vqa" if task == "answer" else task)
        from vlkit.models.qformer_decoding import lavis_caption_config

        tok = self.qformer_tokenizer
        return lavis_caption_config(eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)

    def _check_llm_length(self, prompts: list[str], task: str, generation: dict[str, Any]) -> Any:
        """Refuse prompts that cannot fit the LLM's positions with the queries and the new tokens (a clear
        error instead of an index error deep inside the LLM); returns the task's generation config."""
        config = self.processor.generation_config(task, **_gen(generation))
        limit = self.processor.lm.hf_config.get("max_position_embeddings")
        if not limit or not self.processor.causal:  # T5's relative positions have no hard limit
            return config
        ids = self.processor.prompts(prompts).input_ids  # (B, T), cut at max_txt_len where the model cuts
        need = self.processor.num_query_tokens + ids.shape[1] + config.max_new_tokens
        if need > limit:
            raise DataError(
                f"a prompt of {ids.shape[1]} tokens + {self.processor.num_query_tokens} query tokens + "
                f"{config.max_new_tokens} new tokens exceeds the LLM's {limit} positions; shorten it or lower "
                "max_new_tokens"
            )
        return config

    # ------------------------------------------------------------------------------------------ tasks
    def caption(
        self,
        images: ImageSource | Sequence[ImageSource],
        prompt: str | None = None,
        *,
        decoder: Literal["auto", "llm", "qformer"] = "auto",
        **generation: Any,
    ) -> str | list[str] | list[list[str]]:
        """Caption images.

        Args:
            images: one image or a list.
            prompt: text the caption continues (LLM models; default: the model's own prompt, "" for
                pretrained BLIP-2, "A short image caption." as InstructBLIP's instruction).
            decoder: "llm" (stage 2), "qformer" (the stage-1 Q-Former decoder, LAVIS ``Blip2Qformer.generate``
                defaults) or "auto" (the LLM when the model has one).
            generation: :class:`~vlkit.generation.GenerationConfig` overrides (``num_beams``,
                ``max_new_tokens``, ``do_sample``, ``num_return_sequences``, ...).

        Returns:
            One caption per image (a list of ``num_return_sequences`` captions per image when that is > 1);
            a single string for a single image.
        """
        self.require("caption")
        use_llm = self._caption_decoder(decoder)
        pixels = self.pixels(images)
        with torch.no_grad():
            if use_llm:
                from vlkit.prompting import caption

                default = self.processor.lm.prompt or ("A short image caption." if self.arch == "instructblip" else "")
                self._check_llm_length([default if prompt is None else prompt], "caption", generation)
                texts = caption(self.model, self.processor, pixels, prompt=prompt, **_gen(generation))
                per_image = _gen(generation).get("num_return_sequences", 1)
            else:
                if prompt:
                    raise DataError("the Q-Former captioner takes no prompt")
                from vlkit.models.qformer_decoding import caption_qformer

                config = _replace(self.generation_defaults("caption", decoder="qformer"), generation)
                texts = caption_qformer(self.model, self.qformer_tokenizer, pixels, config)
                per_image = config.num_return_sequences
        grouped: list[Any] = (
            texts if per_image == 1 else [texts[i : i + per_image] for i in range(0, len(texts), per_image)]
        )
        return grouped[0] if _is_single(images) else grouped

    def _caption_decoder(self, decoder: str) -> bool:
        has_llm = self.processor is not None
        has_qformer = self.arch == "blip2" and self._qformer_captions()
        if decoder == "auto":
            return has_llm
        if decoder == "llm" and has_llm:
            return True
        if decoder == "qformer" and has_qformer:
            return False
        if decoder not in ("llm", "qformer"):
            raise DataError(f"decoder must be 'auto', 'llm' or 'qformer', got {decoder!r}")
        raise UnsupportedTaskError(f"model {self.name} has no {decoder} caption decoder")

    def answer(
        self,
        images: ImageSource | Sequence[ImageSource],
        questions: str | Sequence[str],
        **generation: Any,
    ) -> str | list[str]:
        """Answer questions about images (visual question answering).

        LLM models generate a short answer ("Question: {} Short answer:", beam 5, at most 10 new tokens;
        ``generation`` overrides); VLMo picks the best answer of its classifier.

        Args:
            images: one image or a list.
            questions: one question or a list; one per image, or one image with many questions, or one
                question for many images.

        Returns:
            One answer per (image, question) pair; a string for one image and one question.
        """
        self.require("answer")
        single = _is_single(images) and isinstance(questions, str)
        image_list, question_list = _pairs(_as_list(images, "images"), _texts(questions, "questions"), "questions")
        pixels = self.pixels(image_list)
        with torch.no_grad():
            if self.arch == "vlmo":
                if generation:
                    raise DataError(
                        f"VLMo answers with a classifier; generation settings do not apply: {sorted(generation)}"
                    )
                ids, mask = self.text_tokenizer(question_list)
                logits = self.model.vqa_logits(ids.to(self.device), mask.to(self.device), pixels)
                out = self.vqa_vocab.decode(logits.float().cpu())
            else:
                from vlkit.processors import blip_question
                from vlkit.prompting import VQA_PROMPT, answer

                prompts = [VQA_PROMPT.format(blip_question(q)) for q in question_list]
                self._check_llm_length(prompts, "vqa", generation)
                out = answer(self.model, self.processor, pixels, question_list, **_gen(generation))
        return out[0] if single else out

    def instruct(
        self,
        images: ImageSource | Sequence[ImageSource],
        prompts: str | Sequence[str],
        **generation: Any,
    ) -> str | list[str]:
        """Follow free-form instructions about images (InstructBLIP: beam 5, at most 256 new tokens,
        repetition penalty 1.5; ``generation`` overrides).

        Args:
            images: one image or a list.
            prompts: one instruction or a list (paired with the images like :meth:`answer`'s questions).

        Returns:
            One response per (image, prompt) pair; a string for one image and one prompt.
        """
        self.require("instruct")
        from vlkit.prompting import generate_text

        single = _is_single(images) and isinstance(prompts, str)
        image_list, prompt_list = _pairs(_as_list(images, "images"), _texts(prompts, "prompts"), "prompts")
        pixels = self.pixels(image_list)
        config = self._check_llm_length(prompt_list, "instruct", generation)
        out = generate_text(self.model, self.processor, pixels, prompt_list, config)
        return out[0] if single else out

    def classify(
        self,
        images: ImageSource | Sequence[ImageSource],
        candidate_labels: Sequence[str],
        hypothesis_template: str = "a photo of {}.",
        *,
        top_k: int | None = None,
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Zero-shot classification among ``candidate_labels`` (ITC, prompts cached per label set).

        Args:
            images: one image or a list.
            candidate_labels: class names (a list, or one comma-separated string).
            hypothesis_template: prompt with one ``{}`` for the label.
            top_k: keep the best ``top_k`` labels per image (default all).

        Returns:
            Per image, ``[{"label": str, "score": float}, ...]`` best first (softmax over the labels).
        """
        self.require("classify")
        from vlkit.evaluation.zeroshot import classify

        labels = _labels(candidate_labels)
        pixels = self.pixels(images)
        out = classify(self.model, self.qformer_tokenizer, pixels, labels, hypothesis_template, top_k=top_k)
        return out[0] if _is_single(images) else out

    def itm(self, images: ImageSource | Sequence[ImageSource], texts: str | Sequence[str]) -> float | list[float]:
        """Probability that each (image, text) pair matches (the ITM head, texts cut at 32 tokens).

        Pairs are formed as in :meth:`answer`. Returns a float for one image and one text.
        """
        self.require("itm")
        from vlkit.evaluation.features import itm_scores

        single = _is_single(images) and isinstance(texts, str)
        image_list, text_list = _as_list(images, "images"), _texts(texts, "texts")
        _pairs(image_list, text_list, "texts")  # checks the counts
        scores = itm_scores(self.model, self.qformer_tokenizer, self.pixels(image_list), text_list).tolist()
        return scores[0] if single else scores

    def retrieve(
        self, images: Sequence[ImageSource], texts: Sequence[str], *, k: int = 5
    ) -> dict[str, list[list[dict[str, Any]]]]:
        """Image-text retrieval in both directions over a small gallery (LAVIS ``compute_sim_matrix``: the
        ``k`` most similar candidates by ITC are re-scored as ITM logit + ITC cosine).

        Args:
            images: the gallery images.
            texts: the texts.
            k: matches returned per query (at most the gallery size).

        Returns:
            ``{"image_to_text": per image [{"index", "text", "score"}, ...],
            "text_to_image": per text [{"index", "score"}, ...]}``, best first.
        """
        self.require("retrieve")
        from vlkit.evaluation.retrieval import compute_sim_matrix
        from vlkit.processors import blip_caption

        if k < 1:
            raise DataError(f"k must be >= 1, got {k}")
        image_list, text_list = _as_list(images, "images"), _texts(texts, "texts")
        pixels = self.pixels(image_list)
        k_test = min(k, max(len(image_list), len(text_list)))
        scores = compute_sim_matrix(
            self.model,
            self.qformer_tokenizer,
            pixels,
            text_list,
            k_test=k_test,
            text_processor=blip_caption,
            max_length=min(35, self.model.qformer.config.max_position_embeddings),
            progress=False,
        )
        i2t = _top(scores.i2t, min(k, len(text_list)))
        t2i = _top(scores.t2i, min(k, len(image_list)))
        return {
            "image_to_text": [[{"index": j, "text": text_list[j], "score": s} for j, s in row] for row in i2t],
            "text_to_image": [[{"index": i, "score": s} for i, s in row] for row in t2i],
        }

    def embed_images(self, images: ImageSource | Sequence[ImageSource]) -> Tensor:
        """L2-normalised image embeddings: (B, Q, E) float32 on the CPU, one E-vector per query ((Q, E) for a
        single image). An image-text similarity is the max over queries of the dot products with a text
        embedding (what ITC and :meth:`retrieve` use)."""
        self.require("embed")
        from vlkit.evaluation.features import image_features

        feats = image_features(self.model, self.pixels(images)).image_embeds_proj.cpu()
        return feats[0] if _is_single(images) else feats

    def embed_texts(self, texts: str | Sequence[str]) -> Tensor:
        """L2-normalised text embeddings ([CLS] projection): (B, E) float32 on the CPU ((E,) for one string)."""
        self.require("embed")
        from vlkit.evaluation.features import text_features

        feats = text_features(
            self.model,
            self.qformer_tokenizer,
            _texts(texts, "texts"),
            max_length=self.model.qformer.config.max_position_embeddings,
        ).text_embeds_proj[:, 0]
        feats = feats.cpu()
        return feats[0] if isinstance(texts, str) else feats


def _default_qformer_tokenizer(vocab_size: int) -> Any:
    from vlkit.processors import QFormerTokenizer, find_bert_vocab

    vocab = find_bert_vocab()
    if vocab is None:
        return None
    tokenizer = QFormerTokenizer(vocab)
    return tokenizer if len(tokenizer) <= vocab_size else None


def _labels(candidate_labels: str | Sequence[str]) -> list[str]:
    if isinstance(candidate_labels, str):
        candidate_labels = candidate_labels.split(",")
    labels = [str(label).strip() for label in candidate_labels]
    if not labels or any(not label for label in labels):
        raise DataError("candidate_labels must be non-empty strings")
    return labels


def _top(matrix: Tensor, k: int) -> list[list[tuple[int, float]]]:
    scores, index = matrix.topk(k, dim=1)
    return [list(zip(i, s)) for i, s in zip(index.tolist(), scores.tolist())]


def _gen(generation: dict[str, Any]) -> dict[str, Any]:
    """Check generation overrides against ``GenerationConfig`` and drop None values (optional settings
    pass straight through)."""
    from dataclasses import fields

    from vlkit.generation import GenerationConfig

    known = {f.name for f in fields(GenerationConfig)}
    unknown = sorted(set(generation) - known)
    if unknown:
        raise DataError(f"unknown generation setting(s) {unknown}; known: {sorted(known)}")
    return {k: v for k, v in generation.items() if v is not None}


def _replace(config: Any, generation: dict[str, Any]) -> Any:
    return config.replace(**_gen(generation))
