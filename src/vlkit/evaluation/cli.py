"""``vlkit eval TASK --model PATH --data ANNOTATIONS --images DIR [...]``: evaluate a model on a split.

Tasks and the models they take:

* ``caption``: COCO caption evaluation (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE when available). A stage-1
  BLIP-2 captions with its Q-Former (LAVIS ``Blip2Qformer.generate`` defaults: 3 beams, at most 29 / at least
  9 new tokens); a stage-2 BLIP-2 with its LLM and the model's prompt (COCO evaluation settings: 5 beams,
  at most 30 / at least 8 new tokens, 7 for FlanT5, whose min_length counts the decoder start token);
  InstructBLIP with the prompt "A short image caption." (5 beams, at most 80 / at least 10 new tokens, 9 for
  FlanT5).
* ``vqa``: official VQAv2 accuracy. Stage-2 BLIP-2 answers "Question: {} Short answer:" (5 beams, at most
  10 new tokens, length penalty 0 for decoder-only and -1 for encoder-decoder LLMs); InstructBLIP answers
  "Question: {} Short Answer:" with length penalty -1. ``--rank-candidates FILE`` picks each answer from a
  list by likelihood instead of generating.
* ``retrieval``: LAVIS image-text retrieval with a stage-1 BLIP-2 (ITC, then ITM re-ranking of the top
  ``--k-test`` candidates), Recall@1/5/10 both ways.
* ``classification``: zero-shot top-1/top-5 over a class-folder dataset with a stage-1 BLIP-2 (prompts
  ``--template`` with each class name; ITC similarity / temperature).
* VLMo models (``vqa``, ``retrieval``, ``nlvr2``) enter through one dispatch point, :func:`run_vlmo`.

``--data`` is the annotation file of the task (caption / retrieval: a COCO-Karpathy or Flickr30k eval JSON;
vqa: the questions JSON; classification: the class-folder root), or a shapes-world root (``vlkit data
shapes``), whose ``--split`` files are then used. Outputs go to ``--output``: ``predictions.json`` in the
official result format, ``metrics.json``, and with ``--save-scores`` the score matrices as ``.npy``.

Under ``python -m torch.distributed.run --nproc_per_node N -m vlkit eval ...`` every rank evaluates a
shard of whole batches and rank 0 gathers the predictions and writes the files; the numbers are those of a
single process (see :mod:`vlkit.evaluation.tasks`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("caption", "vqa", "retrieval", "classification", "nlvr2")
#: Tasks a VLMo model is evaluated on (through :func:`run_vlmo`).
VLMO_TASKS = ("vqa", "retrieval", "nlvr2")
INSTRUCT_CAPTION_PROMPT = "A short image caption."
INSTRUCT_VQA_TEMPLATE = "Question: {} Short Answer:"
DEFAULT_CLASS_TEMPLATE = "a photo of {}."
PREDICTIONS_FILE = "predictions.json"
METRICS_FILE = "metrics.json"
DTYPES = ("auto", "float32", "bfloat16", "float16")

# What each model kind can be evaluated on, for error messages.
_KIND_NAMES = {
    "stage1": "a stage-1 BLIP-2 (Q-Former, no LLM)",
    "stage2": "a stage-2 BLIP-2 (with an LLM)",
    "instructblip": "an InstructBLIP model",
    "vlmo": "a VLMo model",
}
_TASK_KINDS = {
    "caption": ("stage1", "stage2", "instructblip"),
    "vqa": ("stage2", "instructblip", "vlmo"),
    # A stage-2 BLIP-2 does them when it kept the stage-1 heads (``keep_stage1``, e.g. shapes-blip2).
    "retrieval": ("stage1", "stage2", "vlmo"),
    "classification": ("stage1", "stage2"),
    "nlvr2": ("vlmo",),
}


# ----------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model and data")
    g.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="vlkit folder, transformers folder, LAVIS .pth, unilm .pt, or a bundled model name (shapes-blip2, ...)",
    )
    g.add_argument(
        "--data",
        metavar="PATH",
        help="the task's annotation file (classification: the class-folder root), or a shapes-world root",
    )
    g.add_argument("--images", metavar="DIR", help="image root the annotation paths are relative to")
    g.add_argument("--split", default="test", help="split of a shapes world; a label otherwise (default: test)")
    g.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N images (vqa: questions)")
    g.add_argument("--qformer-tokenizer", metavar="PATH", help="BERT vocab.txt / tokenizer folder for the Q-Former")
    g.add_argument("--vision", metavar="FILE", help="LAVIS checkpoints: the ViT weights file")
    g.add_argument("--llm", metavar="DIR", help="LAVIS stage-2 checkpoints: the LLM's transformers folder")
    r = common.add_argument_group("running")
    r.add_argument("--batch-size", type=int, default=16, metavar="N", help="samples per forward pass (default 16)")
    r.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, ...")
    r.add_argument(
        "--devices",
        metavar="LIST",
        help="VLMo: split the blocks over these devices, e.g. cuda:0,cuda:1 (first half on the first)",
    )
    g.add_argument("--vlmo-tokenizer", metavar="PATH", help="VLMo: vocab.txt / folder (default: the model's)")
    r.add_argument("--dtype", default="auto", choices=DTYPES, help="weights dtype (auto: as stored)")
    r.add_argument("--num-workers", type=int, default=0, metavar="N", help="DataLoader workers (default 0)")
    r.add_argument("--output", metavar="DIR", help="where the files go (default: eval/TASK-SPLIT)")
    r.add_argument("--quiet", action="store_true", help="no progress bars and no table")
    return common


def _generation_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("generation (defaults depend on the model, see the description)")
    g.add_argument("--num-beams", type=int, metavar="N")
    g.add_argument("--max-new-tokens", type=int, metavar="N")
    g.add_argument("--min-new-tokens", type=int, metavar="N")
    g.add_argument("--repetition-penalty", type=float, metavar="X")
    g.add_argument("--length-penalty", type=float, metavar="X")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlkit eval",
        description="Evaluate a model on a caption, VQA, retrieval or classification split.",
        epilog=(
            "examples:\n"
            "  vlkit data shapes world && vlkit eval caption --model MODEL --data world\n"
            "  vlkit eval caption --model MODEL --data coco_karpathy_test.json --images coco/images "
            "--references coco_karpathy_test_gt.json\n"
            "  vlkit eval vqa --model MODEL --questions v2_OpenEnded_mscoco_val2014_questions.json "
            "--annotations v2_mscoco_val2014_annotations.json --images coco/images\n"
            "  python -m torch.distributed.run --nproc_per_node 8 -m vlkit eval retrieval --model MODEL --data world"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    common = _common()

    caption = sub.add_parser(
        "caption",
        parents=[common],
        help="COCO caption metrics",
        description=(
            "COCO caption evaluation. Stage-1 BLIP-2: Q-Former captioning, 3 beams, <= 29 / >= 9 new tokens. "
            "Stage-2 BLIP-2: the model's prompt, 5 beams, <= 30 / >= 8 new tokens (FlanT5: >= 7). InstructBLIP: "
            f"prompt {INSTRUCT_CAPTION_PROMPT!r}, 5 beams, <= 80 / >= 10 new tokens (FlanT5: >= 9)."
        ),
    )
    caption.add_argument(
        "--references",
        metavar="FILE",
        help="COCO ground-truth file (default: ANNOTATIONS_gt.json beside --data if present, else its captions)",
    )
    caption.add_argument("--metrics", metavar="LIST", help="comma-separated COCO metrics (default: all, SPICE too)")
    caption.add_argument("--prompt", help="LLM prompt (default: the model's; InstructBLIP: 'A short image caption.')")
    _generation_args(caption)

    vqa = sub.add_parser(
        "vqa",
        parents=[common],
        help="VQAv2 accuracy",
        description=(
            "VQAv2 accuracy. Stage-2 BLIP-2: 'Question: {} Short answer:', 5 beams, <= 10 new tokens, length "
            f"penalty 0 (decoder-only) / -1 (encoder-decoder). InstructBLIP: {INSTRUCT_VQA_TEMPLATE!r}, length "
            "penalty -1."
        ),
    )
    vqa.add_argument("--questions", metavar="FILE", help="VQAv2 questions JSON (default: --data)")
    vqa.add_argument("--annotations", metavar="FILE", help="VQAv2 annotations JSON (none: predictions only)")
    vqa.add_argument(
        "--image-template",
        metavar="PATTERN",
        help="image path pattern over {image_id} and {data_subtype} (default: COCO's, or the shapes world's)",
    )
    vqa.add_argument("--template", help="prompt with one {} for the question")
    vqa.add_argument("--answers", metavar="FILE", help="VLMo: answer label file (default: the model's)")
    vqa.add_argument("--rank-candidates", metavar="FILE", help="answer list (JSON list or one per line) to rank")
    vqa.add_argument("--candidate-chunk-size", type=int, metavar="N", help="candidates scored at once when ranking")
    _generation_args(vqa)

    retrieval = sub.add_parser("retrieval", parents=[common], help="image-text Recall@K")
    retrieval.add_argument("--k-test", type=int, default=128, metavar="K", help="ITM re-ranked candidates (128)")
    retrieval.add_argument("--itm-batch-size", type=int, default=128, metavar="N", help="pairs per ITM pass (128)")
    retrieval.add_argument("--save-scores", action="store_true", help="write scores_i2t.npy and scores_t2i.npy")
    retrieval.add_argument(
        "--itm-rerank-k", type=int, default=0, metavar="K", help="VLMo: re-rank the top K with ITM (0: ITC only)"
    )

    classification = sub.add_parser("classification", parents=[common], help="zero-shot top-1 / top-5")
    classification.add_argument("--labels", metavar="FILE", help="class names, one per line (default: folder names)")
    classification.add_argument(
        "--template", default=DEFAULT_CLASS_TEMPLATE, help=f"class prompt (default {DEFAULT_CLASS_TEMPLATE!r})"
    )
    classification.add_argument("--save-scores", action="store_true", help="write scores_logits.npy (N, C)")

    sub.add_parser("nlvr2", parents=[common], help="NLVR2 accuracy (VLMo models)")
    return parser


# ----------------------------------------------------------------------------------------------------------
# Data files
# ----------------------------------------------------------------------------------------------------------


def _is_shapes_root(path: str | None) -> bool:
    return path is not None and Path(path).is_dir() and (Path(path) / "manifest.json").is_file()


def _file(path: str | os.PathLike, option: str) -> Path:
    from vlkit.errors import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{option} {p}: no such file")
    return p


def _folder(path: str | os.PathLike, option: str) -> Path:
    from vlkit.errors import DataError

    p = Path(path)
    if not p.is_dir():
        raise DataError(f"{option} {p}: no such folder")
    return p


def _required(value: str | None, option: str, task: str, what: str) -> str:
    from vlkit.errors import DataError

    if value is None:
        alternative = "or a shapes-world root" if option == "--data" else "or --data SHAPES_WORLD"
        raise DataError(f"vlkit eval {task} needs {option} ({what}), {alternative}")
    return value


def _given_data(args: argparse.Namespace) -> dict[str, Any]:
    names = ("data", "images", "questions", "annotations", "labels", "references")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def resolve_data(args: argparse.Namespace) -> dict[str, Any]:
    """The files of the task, from a shapes-world root or the explicit options; every one checked to exist.

    Returns:
        Named paths (``annotations``, ``images``, ``references``, ``questions``, ``vqa_annotations``,
        ``image_template``, ``root``, ``labels``, as the task needs).

    Raises:
        DataError: a missing file or folder, or a required option not given.
    """
    from vlkit.data.shapes import shapes_paths

    task = args.task
    shapes = shapes_paths(args.data, args.split) if _is_shapes_root(args.data) else None
    out: dict[str, Any] = {}
    if task == "nlvr2":  # VLMo only: its data sources are read by the VLMo evaluation (see run_vlmo)
        return _given_data(args)
    if task in ("caption", "retrieval"):
        if shapes is not None:
            out["annotations"] = shapes.coco_captions if task == "caption" else shapes.flickr
            out["images"] = shapes.image_root
        else:
            out["annotations"] = _file(_required(args.data, "--data", task, "the annotation file"), "--data")
            out["images"] = _folder(_required(args.images, "--images", task, "the image root"), "--images")
        if task == "caption":
            if getattr(args, "references", None):
                out["references"] = _file(args.references, "--references")
            elif shapes is not None:
                out["references"] = shapes.coco_ground_truth
            else:
                sibling = out["annotations"].with_name(out["annotations"].stem + "_gt.json")
                out["references"] = sibling if sibling.is_file() else None
    elif task == "vqa":
        if shapes is not None:
            out["questions"] = _file(args.questions, "--questions") if args.questions else shapes.vqa_questions
            annotations = args.annotations or shapes.vqa_annotations
            out["images"] = shapes.image_root
            out["image_template"] = args.image_template or shapes.vqa_image_template
        else:
            questions = args.questions or args.data
            out["questions"] = _file(_required(questions, "--questions", task, "the questions JSON"), "--questions")
            annotations = args.annotations
            out["images"] = _folder(_required(args.images, "--images", task, "the image root"), "--images")
            out["image_template"] = args.image_template
        out["vqa_annotations"] = _file(annotations, "--annotations") if annotations else None
    elif task == "classification":
        if shapes is not None:
            out["root"] = shapes.classification_root
            out["labels"] = _file(args.labels, "--labels") if args.labels else shapes.labels
        else:
            root = args.data or args.images
            out["root"] = _folder(_required(root, "--data", task, "the class-folder root"), "--data")
            out["labels"] = _file(args.labels, "--labels") if args.labels else None
    for key in ("annotations", "questions", "references", "vqa_annotations", "labels"):
        if out.get(key) is not None:
            _file(out[key], f"{key} file")
    for key in ("images", "root"):
        if out.get(key) is not None:
            _folder(out[key], f"{key} folder")
    return out


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


def model_kind(config: Any) -> str:
    """ "stage1", "stage2", "instructblip" or "vlmo" for a model config."""
    from vlkit.errors import ConfigError
    from vlkit.models import Blip2Config, InstructBlipConfig, VLMoConfig

    if isinstance(config, VLMoConfig):
        return "vlmo"
    if isinstance(config, InstructBlipConfig):
        return "instructblip"
    if isinstance(config, Blip2Config):
        return "stage1" if config.lm is None else "stage2"
    raise ConfigError(f"{type(config).__name__} is not a model vlkit eval knows")


def check_task(task: str, kind: str, config: Any, model: str) -> None:
    """Raise a :class:`~vlkit.errors.ConfigError` when ``model`` (of ``kind``) cannot be evaluated on ``task``."""
    from vlkit.errors import ConfigError

    if kind not in _TASK_KINDS[task]:
        takes = ", ".join(_KIND_NAMES[k] for k in _TASK_KINDS[task])
        raise ConfigError(f"vlkit eval {task} needs {takes}; {model} is {_KIND_NAMES[kind]}")
    if kind not in ("stage1", "stage2"):
        return
    if kind == "stage1" and task == "caption" and not config.qformer.lm_head:
        raise ConfigError(f"{model}: this stage-1 Q-Former has no language-model head, so it cannot caption")
    if task in ("retrieval", "classification") and not (config.itc_itm_heads and config.qformer.text_input):
        raise ConfigError(
            f"{model}: vlkit eval {task} needs the Q-Former's text input and the ITC/ITM heads, which this model "
            "does not have (a stage-1 BLIP-2 has them; a stage-2 one only when trained with keep_stage1)"
        )


def _peek_config(path: str) -> Any | None:
    """The config of a vlkit folder without loading its weights; None for other checkpoint kinds."""
    from vlkit.checkpoints.folder import CONFIG_FILE, read_config
    from vlkit.errors import CheckpointError

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"--model {p}: no such file or folder")
    if p.is_dir() and (p / CONFIG_FILE).is_file():
        return read_config(p)[1]
    return None


def _device(name: str) -> Any:
    import torch

    from vlkit.errors import ConfigError

    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"--device {name!r}: {err}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available")
        if device.index is None:  # one GPU per process under torchrun
            device = torch.device("cuda", local_rank)
    return device


def _dtype(name: str) -> Any:
    import torch

    return None if name == "auto" else getattr(torch, name)


def _qformer_tokenizer(loaded: Any, args: argparse.Namespace, config: Any) -> Any:
    from vlkit.errors import ConfigError
    from vlkit.processors import QFormerTokenizer, find_bert_vocab

    if args.qformer_tokenizer:
        tokenizer = QFormerTokenizer(args.qformer_tokenizer)
    elif loaded.qformer_tokenizer is not None:
        tokenizer = loaded.qformer_tokenizer
    else:
        vocab = find_bert_vocab()
        if vocab is None:
            raise ConfigError(
                f"{args.model} has no qformer_tokenizer/ and no bert-base-uncased vocabulary is installed: "
                "pass --qformer-tokenizer vocab.txt"
            )
        tokenizer = QFormerTokenizer(vocab)
    if len(tokenizer) > config.qformer.vocab_size:
        raise ConfigError(
            f"the Q-Former tokenizer has {len(tokenizer)} tokens but the model's Q-Former only "
            f"{config.qformer.vocab_size}"
        )
    return tokenizer


def _llm_processor(loaded: Any, args: argparse.Namespace, kind: str) -> Any:
    from vlkit.errors import ConfigError
    from vlkit.prompting import LLMProcessor

    if loaded.llm_tokenizer is None:
        raise ConfigError(f"{args.model}: no LLM tokenizer found (a vlkit folder keeps it in llm_tokenizer/)")
    qformer = _qformer_tokenizer(loaded, args, loaded.model.config) if kind == "instructblip" else None
    return LLMProcessor(loaded.model.config, loaded.llm_tokenizer, qformer)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ("num_beams", "max_new_tokens", "min_new_tokens", "repetition_penalty", "length_penalty")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _settings_of(config: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(config).items() if v is not None}


# ----------------------------------------------------------------------------------------------------------
# Task set-up: model-side callables and datasets
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What a task run needs besides the dataset: the runner's call and the settings to record."""

    run: Callable[[], Any]
    settings: dict[str, Any] = field(default_factory=dict)


def _image_processor(model: Any) -> Any:
    from vlkit.processors import make_image_processor

    return make_image_processor("blip_image_eval", model.config.vision.image_size)


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _caption_setup(loaded: Any, kind: str, args: argparse.Namespace, data: dict[str, Any]) -> Setup:
    import torch

    from vlkit.data.datasets import CaptionDataset
    from vlkit.errors import ConfigError, DataError
    from vlkit.evaluation.tasks import run_caption
    from vlkit.metrics.caption import CAPTION_METRICS, load_coco_references
    from vlkit.models.qformer_decoding import caption_qformer, lavis_caption_config
    from vlkit.prompting import generate_text

    model = loaded.model
    device = next(model.parameters()).device
    overrides = _overrides(args)
    settings: dict[str, Any] = {}
    if kind == "stage1":
        if args.prompt is not None:
            raise ConfigError("--prompt: Q-Former captioning (a stage-1 model) takes no prompt")
        tokenizer = _qformer_tokenizer(loaded, args, model.config)
        base = lavis_caption_config(eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
        config = base.replace(**overrides)

        def captioner(pixels: torch.Tensor) -> list[str]:
            return caption_qformer(model, tokenizer, pixels.to(device), config)

        settings["decoder"] = "qformer"
    else:
        processor = _llm_processor(loaded, args, kind)
        # The reference's caption yaml lengths (COCO: max 30 / min 8; InstructBLIP: max 80 / min 10). Its
        # encoder-decoder LLMs count the decoder start token in min_length, so they need one new token less.
        max_len, min_len = (80, 10) if kind == "instructblip" else (30, 8)
        defaults = {"max_new_tokens": max_len, "min_new_tokens": min_len - (0 if processor.causal else 1)}
        if kind == "instructblip":
            prompt = INSTRUCT_CAPTION_PROMPT if args.prompt is None else args.prompt
        else:
            prompt = processor.lm.prompt if args.prompt is None else args.prompt
        config = processor.generation_config("caption", **{**defaults, **overrides})

        def captioner(pixels: torch.Tensor) -> list[str]:
            return generate_text(model, processor, pixels.to(device), [prompt] * pixels.shape[0], config)

        settings.update(decoder="llm", prompt=prompt)
    settings["generation"] = _settings_of(config)
    metrics = list(CAPTION_METRICS)
    if args.metrics:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        unknown = [m for m in metrics if m not in CAPTION_METRICS]
        if unknown or not metrics:
            raise DataError(f"--metrics {args.metrics!r}: choose from {', '.join(CAPTION_METRICS)}")
    settings["metrics"] = metrics
    dataset = CaptionDataset(data["annotations"], data["images"], _image_processor(model))
    references = load_coco_references(data["references"]) if data.get("references") else None
    return Setup(
        lambda: run_caption(
            captioner,
            dataset,
            references,
            metrics=metrics,
            batch_size=args.batch_size,
            limit=args.limit,
            num_workers=args.num_workers,
            progress=_progress(args),
        ),
        settings,
    )


def _read_candidates(path: Path) -> list[str]:
    import json

    from vlkit.errors import DataError

    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(data, list) or not data or not all(isinstance(a, str) and a for a in data):
        raise DataError(f"--rank-candidates {path}: expected a non-empty JSON list of strings or one answer per line")
    if len(set(data)) != len(data):
        raise DataError(f"--rank-candidates {path}: the answer list has duplicates")
    return data


def _check_template(template: str, option: str) -> None:
    from vlkit.errors import ConfigError

    if template.count("{}") != 1:
        raise ConfigError(f"{option} {template!r}: needs exactly one '{{}}'")


def _vqa_setup(loaded: Any, kind: str, args: argparse.Namespace, data: dict[str, Any]) -> Setup:
    import torch

    from vlkit.data.datasets import COCO_VQA_IMAGE_TEMPLATE, VQADataset
    from vlkit.evaluation.tasks import run_vqa
    from vlkit.metrics.vqa import load_vqa_annotations
    from vlkit.processors import blip_question
    from vlkit.prompting import VQA_PROMPT, generate_text, rank_candidates

    model = loaded.model
    device = next(model.parameters()).device
    processor = _llm_processor(loaded, args, kind)
    instruct = kind == "instructblip"
    template = args.template or (INSTRUCT_VQA_TEMPLATE if instruct else VQA_PROMPT)
    _check_template(template, "--template")
    settings: dict[str, Any] = {"template": template}

    def prompts(questions: list[str]) -> list[str]:
        return [template.format(blip_question(q)) for q in questions]

    if args.rank_candidates:
        candidates = _read_candidates(_file(args.rank_candidates, "--rank-candidates"))
        settings.update(mode="rank", candidates=len(candidates))

        def answerer(pixels: torch.Tensor, questions: list[str]) -> list[str]:
            ranks, _ = rank_candidates(
                model,
                processor,
                pixels.to(device),
                prompts(questions),
                candidates,
                chunk_size=args.candidate_chunk_size,
            )
            return [candidates[i] for i in ranks[:, 0].tolist()]

    else:
        defaults = {"length_penalty": -1.0} if instruct else {}
        config = processor.generation_config("vqa", **{**defaults, **_overrides(args)})
        settings.update(mode="generate", generation=_settings_of(config))

        def answerer(pixels: torch.Tensor, questions: list[str]) -> list[str]:
            return generate_text(model, processor, pixels.to(device), prompts(questions), config)

    dataset = VQADataset(
        data["questions"],
        data["vqa_annotations"],
        data["images"],
        _image_processor(model),
        image_template=data["image_template"] or COCO_VQA_IMAGE_TEMPLATE,
    )
    annotations = load_vqa_annotations(data["vqa_annotations"]) if data["vqa_annotations"] else None
    return Setup(
        lambda: run_vqa(
            answerer,
            dataset,
            annotations,
            batch_size=args.batch_size,
            limit=args.limit,
            num_workers=args.num_workers,
            progress=_progress(args),
        ),
        settings,
    )


def _retrieval_setup(loaded: Any, kind: str, args: argparse.Namespace, data: dict[str, Any]) -> Setup:
    from vlkit.data.datasets import RetrievalDataset
    from vlkit.errors import ConfigError
    from vlkit.evaluation.tasks import run_retrieval
    from vlkit.processors import BlipCaptionProcessor

    if args.k_test < 1 or args.itm_batch_size < 1:
        raise ConfigError(f"--k-test and --itm-batch-size must be >= 1, got {args.k_test} and {args.itm_batch_size}")
    model = loaded.model
    tokenizer = _qformer_tokenizer(loaded, args, model.config)
    dataset = RetrievalDataset(data["annotations"], data["images"], _image_processor(model), BlipCaptionProcessor())
    return Setup(
        lambda: run_retrieval(
            model,
            tokenizer,
            dataset,
            k_test=args.k_test,
            batch_size=args.batch_size,
            itm_batch_size=args.itm_batch_size,
            limit=args.limit,
            num_workers=args.num_workers,
            progress=_progress(args),
        ),
        {"k_test": args.k_test, "text_processor": "blip_caption"},
    )


def _classification_setup(loaded: Any, kind: str, args: argparse.Namespace, data: dict[str, Any]) -> Setup:
    import torch

    from vlkit.data.datasets import ImageFolderDataset
    from vlkit.evaluation.features import inference
    from vlkit.evaluation.tasks import run_classification
    from vlkit.evaluation.zeroshot import ZeroShotClassifier

    _check_template(args.template, "--template")
    model = loaded.model
    tokenizer = _qformer_tokenizer(loaded, args, model.config)
    dataset = ImageFolderDataset(data["root"], _image_processor(model), data["labels"])
    labels = [name.replace("_", " ") for name in dataset.classes]
    classifier = ZeroShotClassifier(model, tokenizer, labels, args.template)

    def scorer(pixels: torch.Tensor) -> torch.Tensor:
        with inference(model):
            _, image_feats = classifier.image_inputs(pixels)
            return classifier.logits(image_feats)

    return Setup(
        lambda: run_classification(
            scorer,
            dataset,
            batch_size=args.batch_size,
            limit=args.limit,
            num_workers=args.num_workers,
            progress=_progress(args),
        ),
        {"template": args.template, "classes": len(labels)},
    )


_SETUPS: dict[str, Callable[[Any, str, argparse.Namespace, dict[str, Any]], Setup]] = {
    "caption": _caption_setup,
    "vqa": _vqa_setup,
    "retrieval": _retrieval_setup,
    "classification": _classification_setup,
}


def _vlmo_source(args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    """The VLMo data source (fields of ``VQASource`` / ``RetrievalSource`` / ``NLVR2Source``) of the options.

    ``--data`` may be a shapes-world root (its ``--split`` files), ``.arrow`` tables (comma-separated), or the
    task's annotation file: VQA questions JSON (with ``--annotations``, ``--images``, ``--image-template``),
    a retrieval caption JSON (with ``--images``), or NLVR2 JSON lines (with ``--images``).
    """
    from vlkit.data.shapes import shapes_paths
    from vlkit.errors import DataError

    task = args.task
    if _is_shapes_root(args.data):
        if task == "nlvr2":
            raise DataError(f"--data {args.data}: a shapes world has no NLVR2 split")
        shapes = shapes_paths(args.data, args.split)
        if task == "vqa":
            questions = _file(args.questions, "--questions") if args.questions else shapes.vqa_questions
            annotations = _file(args.annotations, "--annotations") if args.annotations else shapes.vqa_annotations
            return {
                "questions": [questions],
                "annotations": [annotations],
                "image_root": shapes.image_root,
                "image_template": args.image_template or shapes.vqa_image_template,
            }
        return {"annotations": [shapes.flickr], "image_root": shapes.image_root}
    given = data.get("questions") if task == "vqa" else None
    given = given or data.get("data")
    paths = [Path(p) for p in _required(given, "--data", task, "the annotation file or .arrow tables").split(",")]
    for path in paths:
        _file(path, "--data")
    if all(p.suffix == ".arrow" for p in paths):
        return {"arrow": paths}
    if any(p.suffix == ".arrow" for p in paths):
        raise DataError(f"--data {given}: give either .arrow tables or annotation files, not both")
    images = _folder(_required(args.images, "--images", task, "the image root"), "--images")
    if task == "vqa":
        source: dict[str, Any] = {"questions": paths, "image_root": images}
        if args.annotations:
            source["annotations"] = [_file(p, "--annotations") for p in args.annotations.split(",")]
        if args.image_template:
            source["image_template"] = args.image_template
        return source
    if task == "retrieval":
        return {"annotations": paths, "image_root": images}
    return {"jsonl": paths, "image_roots": [images] * len(paths)}


def run_vlmo(args: argparse.Namespace, data: dict[str, Any], model: Any = None) -> Any:
    """The single entry of VLMo models into ``vlkit eval`` (tasks ``vqa``, ``retrieval``, ``nlvr2``).

    Evaluates with :func:`vlkit.evaluation.vlmo.evaluate_vlmo_result` (VQA: the classifier's best answer
    and the official accuracy; retrieval: the dual encoder, re-ranked with ITM when ``--itm-rerank-k`` > 0;
    NLVR2: accuracy), on ``--device`` or split over ``--devices``. The seed's latency, the mean model time
    per sample ("mean of cost"), is reported in ``details["timing"]``.

    Args:
        args: the parsed command line (``args.task``, ``args.model``, batch size, device, ...).
        data: the data options as given (``data``, ``images``, ``questions``, ``annotations``, ...), not
            resolved: VLMo's sources differ from BLIP-2's (arrow tables, NLVR2 files).
        model: the loaded VLMo when the checkpoint was not a vlkit folder (None: load from ``args.model``).

    Returns:
        A :class:`~vlkit.evaluation.tasks.TaskResult`.

    Raises:
        ConfigError: options that do not apply to VLMo (``--limit``, ``--save-scores``, generation settings).
    """
    from vlkit.errors import ConfigError
    from vlkit.evaluation.tasks import TaskResult
    from vlkit.evaluation.vlmo import evaluate_vlmo_result

    if args.limit is not None:
        raise ConfigError("--limit is not supported for VLMo models; evaluate a smaller split instead")
    if getattr(args, "save_scores", False):
        raise ConfigError("--save-scores is not supported for VLMo models")
    for option in ("template", "rank_candidates", "num_beams", "max_new_tokens", "min_new_tokens", "prompt"):
        if getattr(args, option, None) is not None:
            raise ConfigError(f"--{option.replace('_', '-')} does not apply to VLMo, which answers with a classifier")
    source = _vlmo_source(args, data)
    if args.devices:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    else:
        devices = [str(_device(args.device))]
    info, result = evaluate_vlmo_result(
        args.task,
        model if model is not None else args.model,
        source,
        tokenizer=args.vlmo_tokenizer,
        answers=getattr(args, "answers", None),
        devices=devices,
        batch_size=args.batch_size,
        itm_rerank_k=getattr(args, "itm_rerank_k", 0),
        num_workers=args.num_workers,
        dtype=_dtype(args.dtype),
        progress=_progress(args),
    )
    timing_keys = ("mean_cost_ms", "samples_per_second", "num_samples")
    metrics = {k: v for k, v in result.metrics.items() if k not in timing_keys}
    details = dict(result.details)
    details.pop("predictions_file", None)
    details["timing"] = {k: result.metrics[k] for k in timing_keys if k in result.metrics}
    details["devices"] = info["devices"]
    num = int(result.metrics.get("num_samples", len(result.predictions)))
    return TaskResult(metrics=metrics, predictions=result.predictions or None, details=details, num_samples=num)


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------


def _output_dir(args: argparse.Namespace) -> Path:
    return Path(args.output) if args.output else Path("eval") / f"{args.task}-{args.split}"


def write_outputs(
    out: Path, args: argparse.Namespace, kind: str, data: dict[str, Any], result: Any, settings: dict[str, Any]
) -> dict[str, Any]:
    """Write ``predictions.json``, the score arrays (``--save-scores``) and ``metrics.json``; return the latter.

    ``metrics.json`` holds only what determines the numbers (no timings, no process count), so a
    distributed run writes the same file as a single process.
    """
    import numpy as np

    from vlkit.evaluation.tasks import AGG_METRIC
    from vlkit.metrics.report import write_json

    out.mkdir(parents=True, exist_ok=True)
    files = []
    if result.predictions is not None:
        write_json(out / PREDICTIONS_FILE, result.predictions)
        files.append(PREDICTIONS_FILE)
    if getattr(args, "save_scores", False):
        for name, array in result.arrays.items():
            np.save(out / f"scores_{name}.npy", array)
            files.append(f"scores_{name}.npy")
    doc: dict[str, Any] = {
        "task": args.task,
        "model": str(args.model),
        "model_kind": kind,
        "split": args.split,
        "data": {k: (str(v) if v is not None else None) for k, v in data.items()},
        "limit": args.limit,
        "num_samples": result.num_samples,
        "settings": settings,
        "metrics": result.metrics,
        "agg_metrics_definition": AGG_METRIC.get(args.task),
        **result.details,
        "files": files,
    }
    write_json(out / METRICS_FILE, doc)
    return doc


def _table(task: str, result: Any) -> str:
    from vlkit.metrics.report import format_table

    floatfmt = ".4f" if task == "caption" else ".2f"
    rows: list[list[Any]] = [[name, value] for name, value in result.metrics.items()]
    text = format_table(rows, headers=["metric", "value"], floatfmt=floatfmt)
    per_type = result.details.get("per_question_type")
    if per_type:
        text += "\n\n" + format_table(list(per_type.items()), headers=["question type", "accuracy"])
    for reason in result.details.get("unavailable", {}).values():
        text += f"\n{reason}"
    return text


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def evaluate(args: argparse.Namespace) -> tuple[Any, dict[str, Any] | None]:
    """Run a parsed ``vlkit eval`` command: check, load, evaluate (sharded under torchrun), write on rank 0.

    Returns:
        ``(result, metrics document)``; the document is None on ranks other than 0.
    """
    import torch

    from vlkit import distributed
    from vlkit.checkpoints.folder import load_checkpoint
    from vlkit.errors import ConfigError

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not Path(args.model).exists():  # a model name (`vlkit models`): the bundled folder, or how to convert
        from vlkit.api import resolve_model
        from vlkit.errors import CheckpointError

        try:
            args.model = str(resolve_model(args.model))
        except CheckpointError as err:
            raise CheckpointError(f"--model {err}") from None
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    # Everything that can be checked without the model or other ranks is checked first, so bad input
    # fails at once on every rank instead of in the middle of a collective.
    config = _peek_config(args.model)
    kind = model_kind(config) if config is not None else None
    if kind is not None:
        check_task(args.task, kind, config, args.model)
    # VLMo reads its own data sources (VQA/NLVR2/retrieval files or arrow tables): it gets the options as given.
    # Other checkpoints (a unilm VLMo .pt, a LAVIS .pth) tell their kind once loaded.
    data = (resolve_data(args) if kind != "vlmo" else _given_data(args)) if kind is not None else None
    device = _device(args.device)
    owns_group = not distributed.is_distributed()
    distributed.init_from_env(backend="gloo" if device.type == "cpu" else None)
    ok = False
    try:
        if kind == "vlmo":
            result, settings = run_vlmo(args, data), {}
        else:
            loaded = load_checkpoint(
                args.model, device=device, dtype=_dtype(args.dtype), vision=args.vision, llm=args.llm
            )
            kind = model_kind(loaded.model.config)
            check_task(args.task, kind, loaded.model.config, args.model)
            if data is None:
                data = resolve_data(args) if kind != "vlmo" else _given_data(args)
            if kind == "vlmo":
                result, settings = run_vlmo(args, data, loaded.model), {}
            else:
                setup = _SETUPS[args.task](loaded, kind, args, data)
                with torch.no_grad():
                    result = setup.run()
                settings = setup.settings
        doc = None
        if distributed.rank() == 0:
            doc = write_outputs(_output_dir(args), args, kind, data, result, settings)
        ok = True
        return result, doc
    finally:
        if owns_group and distributed.is_distributed():
            if ok:
                distributed.shutdown()
            else:  # no barrier: the other ranks may be stuck in a collective; torchrun stops them
                torch.distributed.destroy_process_group()


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``vlkit eval`` arguments (``["caption", "--model", ...]``) for :func:`evaluate`."""
    return _parser().parse_args(argv)


def main(argv: list[str]) -> int:
    """Run ``vlkit eval ...``; returns the exit status (bad input raises VlkitError: exit 2)."""
    args = parse_args(argv)
    start = time.perf_counter()
    result, doc = evaluate(args)
    if doc is not None and not args.quiet:
        print(_table(args.task, result))
        timing = result.details.get("timing") or {}
        if "mean_cost_ms" in timing:  # the inference guide's latency line
            print(f"mean of cost: {timing['mean_cost_ms']:.3f} ms per sample (batch size {args.batch_size})")
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        print(
            f"{args.task}: {result.num_samples} samples in {time.perf_counter() - start:.1f}s "
            f"({world} process{'es' if world > 1 else ''}); wrote {', '.join(doc['files'] + [METRICS_FILE])} "
            f"to {_output_dir(args)}"
        )
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        # As in `vlkit train`: the group is destroyed and every file is closed, but torchrun + gloo
        # processes occasionally abort in interpreter teardown; nothing is left to do, so leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
