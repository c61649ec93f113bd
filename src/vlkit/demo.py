"""The shapes demo: vlkit's bundled models at work, measured against random initialisation, and the pipeline
that trains them from scratch.

``vlkit demo`` (:func:`run_demo`) loads the three bundled models (``shapes-blip2``, ``shapes-instructblip``,
``shapes-vlmo``), shows them captioning, answering, classifying and retrieving on a held-out shapes test split,
evaluates every task through ``vlkit eval`` and prints one table next to the same architectures with random
weights, and writes a PNG grid of test images with what the models said about them.

``vlkit demo --retrain OUT`` (:func:`retrain`) makes those models again from nothing, through the recipes of
``configs/shapes/`` and the ordinary ``vlkit train`` machinery::

    vlkit data shapes OUT/data --train-images 5000      the world (train / val / test)
    vlkit data tokenizers OUT/data OUT/data/tokenizers  WordPiece for the Q-Former, BPE for the LLMs
    lm_opt, lm_llama                                    tiny OPT and LLaMA pretrained on the shapes text
    stage1                                              ViT + Q-Former: ITC + ITM + ITG
    stage2                                              frozen tiny OPT behind the Q-Former -> shapes-blip2
    instruct                                            InstructBLIP with the frozen tiny LLaMA -> shapes-instructblip
    vlkit data shapes OUT/data_vlmo --train-images 40000  a larger world for the VLMo
    vlmo                                                VLMo VQA classifier trained from scratch -> shapes-vlmo

and evaluates the results the same way. The floors every bundled model must reach are in :data:`CHECKS`; a CI
test holds the bundled models to them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlkit.errors import ConfigError, DataError

#: Demo roles -> bundled model names (``vlkit.api.BUNDLED``).
MODELS: dict[str, str] = {
    "blip2": "shapes-blip2",
    "instructblip": "shapes-instructblip",
    "vlmo": "shapes-vlmo",
}

#: The class prompt the shapes models are evaluated with (labels read "large blue circle").
CLASS_TEMPLATE = "a {}"

#: Images of the demo's test split (the split the floors are checked on).
DEMO_TEST_IMAGES = 100

#: Seed of the demo's shapes world; its test split is the fixed split of the floors (the generator draws every
#: split from its own seed, so the test images do not depend on how many train images a world has).
WORLD_SEED = 0


@dataclass(frozen=True)
class Check:
    """One row of the demo table: a metric of one ``vlkit eval`` run and the floor the bundled model keeps.

    Attributes:
        label: what the row says.
        role: the model (a :data:`MODELS` key).
        task: the ``vlkit eval`` task.
        metric: the key in the run's metrics.
        floor: the quality target of the issues ([demo], [vlmo]) for the bundled model.
        guard: what CI holds the bundled model to: the floor where the bundled model reaches it, else the
            value it reaches less a noise margin (so a regression fails CI while an unmet target stays visible
            in the table instead of being hidden by a lowered floor).
        args: extra ``vlkit eval`` arguments (rows with the same role, task and args share one run).
    """

    label: str
    role: str
    task: str
    metric: str
    floor: float
    guard: float
    args: tuple[str, ...] = ()


#: Guards below a floor: the bundled models' values on the test split (zero-shot VQA 49.8, VLMo VQA 68.1) less about
#: 12 % (see configs/shapes/README.md); those floors are open targets.
CHECKS: tuple[Check, ...] = (
    Check(
        "zero-shot classification top-1 (%)",
        "blip2",
        "classification",
        "top1",
        90.0,
        90.0,
        ("--template", CLASS_TEMPLATE),
    ),
    Check("retrieval TR@1", "blip2", "retrieval", "txt_r1", 60.0, 60.0),
    Check("retrieval IR@1", "blip2", "retrieval", "img_r1", 50.0, 50.0),
    Check("caption CIDEr", "blip2", "caption", "CIDEr", 1.2, 1.2, ("--metrics", "Bleu_4,ROUGE_L,CIDEr")),
    Check("zero-shot VQA accuracy (%)", "blip2", "vqa", "overall", 75.0, 44.0),
    Check("InstructBLIP VQA accuracy (%)", "instructblip", "vqa", "overall", 75.0, 75.0),
    Check("VLMo VQA accuracy (%)", "vlmo", "vqa", "vqa_accuracy", 80.0, 60.0),
)


@dataclass(frozen=True)
class Stage:
    """One step of the retrain pipeline after the main world and its tokenizers: a ``vlkit train`` run, or
    (without a recipe) ``vlkit data shapes`` making one of the other :data:`WORLDS`.

    Attributes:
        name: the run folder under ``OUT/runs`` of a recipe stage; every stage logs to ``OUT/runs/NAME.log``.
        recipe: the recipe file in the recipes folder; None for a stage that makes the world ``world``.
        after: the stages this one waits for (whose exported models or world it uses).
        quick: overrides of the reduced (CI) pipeline, on top of ``run.max_steps``.
        world: the world (a :data:`WORLDS` key, the folder ``OUT/<world>``) the recipe trains on, or that the
            stage makes.
    """

    name: str
    recipe: str | None = None
    after: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()
    world: str = "data"


#: Train images of the full pipeline's main world, and of every world in the reduced one.
TRAIN_IMAGES = 5000
QUICK_TRAIN_IMAGES = 64
QUICK_STEPS = 4

#: The pipeline's worlds (folders under OUT) -> train images. ``data`` (made first, with the tokenizers every
#: recipe uses) serves the BLIP-2 family; the VLMo VQA classifier, trained from scratch, learns more from many
#: images seen once or twice than from 5000 seen many times (configs/shapes/vlmo_vqa.yaml).
WORLDS: dict[str, int] = {"data": TRAIN_IMAGES, "data_vlmo": 40000}

#: The pipeline in the order the scheduler starts stages (each as soon as a job slot is free and the stages it
#: comes after are done): stage 1 takes one core; the LMs go first on the other, so that stage 2 and
#: InstructBLIP can start when stage 1 ends, then the VLMo world and the VLMo.
STAGES: tuple[Stage, ...] = (
    Stage("stage1", "stage1.yaml"),
    Stage("lm_opt", "lm_opt.yaml"),
    Stage("lm_llama", "lm_llama.yaml"),
    Stage("data_vlmo", world="data_vlmo"),
    Stage("vlmo", "vlmo_vqa.yaml", after=("data_vlmo",), world="data_vlmo"),
    Stage("stage2", "stage2.yaml", after=("stage1", "lm_opt")),
    Stage("instruct", "instruct.yaml", after=("stage1", "lm_llama")),
)

#: Which run's exported model plays each demo role.
ROLE_RUNS: dict[str, str] = {"blip2": "stage2", "instructblip": "instruct", "vlmo": "vlmo"}


def recipes_dir() -> Path:
    """``configs/shapes`` of the source checkout vlkit runs from."""
    return Path(__file__).resolve().parents[2] / "configs" / "shapes"


# ----------------------------------------------------------------------------------------------------------
# Data and models
# ----------------------------------------------------------------------------------------------------------


def ensure_world(
    root: Path, *, test_images: int, train_images: int = 1, val_images: int = 1, progress: bool = False
) -> Path:
    """A shapes world at ``root`` with at least ``test_images`` test (``train_images`` train, ``val_images`` val)
    images, made when missing or smaller."""
    from vlkit.data.shapes import generate_shapes_world

    manifest = root / "manifest.json"
    if manifest.is_file():
        try:
            splits = json.loads(manifest.read_text(encoding="utf-8"))["splits"]
            wanted = {"test": test_images, "train": train_images, "val": val_images}
            if all(splits[split]["images"] >= n for split, n in wanted.items()):
                return root
        except (KeyError, ValueError, TypeError):
            pass
    generate_shapes_world(
        root,
        images=test_images,
        train_images=train_images,
        val_images=val_images,
        test_images=test_images,
        seed=WORLD_SEED,
        progress=progress,
    )
    return root


def model_folder(name_or_path: str | os.PathLike) -> Path:
    """The folder of a bundled model name or a model folder."""
    from vlkit.api import resolve_model

    return resolve_model(name_or_path)


def random_init_copy(folder: Path, out: Path, *, seed: int = 0) -> Path:
    """A copy of the model folder ``folder`` at ``out`` whose weights are the architecture's fresh
    initialisation (same config, tokenizers and label files): the baseline the trained model is compared to."""
    import torch

    from vlkit.checkpoints.folder import WEIGHTS_FILE, read_config, tied_aliases
    from vlkit.checkpoints.io import save_safetensors
    from vlkit.models import ARCHS

    arch, config = read_config(folder)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(folder, out)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ARCHS[arch][1](config)
    aliases = tied_aliases(model)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k not in aliases}
    save_safetensors(tensors, out / WEIGHTS_FILE, metadata={"format": "pt", "arch": arch})
    return out


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """Metric values of :data:`CHECKS` rows (by label) and the seconds the evaluations took."""

    values: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0


def evaluate_models(
    models: dict[str, Path],
    world: Path,
    *,
    out: Path,
    device: str = "cpu",
    limit: int | None = None,
    checks: Sequence[Check] = CHECKS,
    progress: bool = False,
) -> Scores:
    """Evaluate every check whose role is in ``models`` on the test split of ``world`` through ``vlkit eval``.

    Args:
        models: role -> model folder.
        world: a shapes world.
        out: where each evaluation writes its predictions and metrics (``out/ROLE-TASK``).
        device: ``vlkit eval --device``.
        limit: ``vlkit eval --limit`` (images; VQA: questions).
        checks: the rows.
        progress: show the evaluations' progress bars.

    Returns:
        The value of each check's metric (None when its model is not in ``models``).
    """
    from vlkit.evaluation.cli import evaluate, parse_args

    start = time.perf_counter()
    scores = Scores()
    runs: dict[tuple[str, str, tuple[str, ...]], dict[str, Any]] = {}
    for check in checks:
        if check.role not in models:
            scores.values[check.label] = None
            continue
        key = (check.role, check.task, check.args)
        if key not in runs:
            argv = [
                check.task,
                "--model", str(models[check.role]),
                "--data", str(world),
                "--split", "test",
                "--device", device,
                "--output", str(out / f"{check.role}-{check.task}"),
                *check.args,
            ]  # fmt: skip
            if limit is not None:
                argv += ["--limit", str(limit)]
            if not progress:
                argv.append("--quiet")
            result, _ = evaluate(parse_args(argv))
            runs[key] = dict(result.metrics)
        value = runs[key].get(check.metric)
        if value is None:
            raise DataError(f"vlkit eval {check.task} on {models[check.role]} reported no {check.metric!r}")
        scores.values[check.label] = float(value)
    scores.seconds = time.perf_counter() - start
    return scores


def format_scores(columns: dict[str, Scores], checks: Sequence[Check] = CHECKS, *, floors: bool = True) -> str:
    """One table: a row per check, a column per set of scores (and the floors)."""
    from vlkit.metrics.report import format_table

    headers = ["metric", *columns]
    if floors:
        headers.append("floor")
    rows = []
    for check in checks:
        row: list[Any] = [check.label]
        for scores in columns.values():
            value = scores.values.get(check.label)
            row.append("-" if value is None else (f"{value:.3f}" if check.task == "caption" else f"{value:.1f}"))
        if floors:
            row.append(f">= {check.floor:g}")
        rows.append(row)
    return format_table(rows, headers=headers)


def failed_floors(scores: Scores, checks: Sequence[Check] = CHECKS, *, bound: str = "floor") -> list[str]:
    """The checks whose value is below its ``bound`` ("floor" or "guard") or missing, as readable lines."""
    failed = []
    for check in checks:
        value, limit = scores.values.get(check.label), getattr(check, bound)
        if value is None or value < limit:
            failed.append(f"{check.label}: {value} < {limit:g}")
    return failed


# ----------------------------------------------------------------------------------------------------------
# Showcase
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Showcase:
    """What the demo shows on a few test images (also drawn into the grid)."""

    images: list[Path]
    captions: list[str]
    questions: list[str]
    truths: list[str]
    answers: dict[str, list[str]]  # role -> answer per question (one question per image)
    classified: list[tuple[Path, str, str, float]]  # image, true label, predicted label, probability
    query: str
    retrieved: list[tuple[Path, float]]
    query_image: Path


def _first_questions(world: Path, n: int) -> list[tuple[Path, str, str]]:
    """One question per image for the first ``n`` test images: (image, question, most common answer)."""
    from collections import Counter

    from vlkit.data.shapes import shapes_paths

    paths = shapes_paths(world, "test")
    questions = json.loads(paths.vqa_questions.read_text(encoding="utf-8"))["questions"]
    annotations = json.loads(paths.vqa_annotations.read_text(encoding="utf-8"))["annotations"]
    answer_of = {a["question_id"]: Counter(x["answer"] for x in a["answers"]).most_common(1)[0][0] for a in annotations}
    chosen: dict[int, tuple[Path, str, str]] = {}
    for q in questions:
        if q["image_id"] in chosen:
            continue
        image = paths.image_root / paths.vqa_image_template.format(image_id=q["image_id"], data_subtype="test")
        chosen[q["image_id"]] = (image, q["question"], answer_of[q["question_id"]])
        if len(chosen) == n:
            break
    return list(chosen.values())


def _one_line(text: str) -> str:
    return " ".join(text.split())


def showcase(pipelines: dict[str, Any], world: Path, *, n: int = 8) -> Showcase:
    """Run every task of the pipelines on a few test images of ``world``."""
    from vlkit.data.shapes import shapes_paths

    paths = shapes_paths(world, "test")
    picked = _first_questions(world, n)
    images = [image for image, _, _ in picked]
    questions = [q for _, q, _ in picked]
    blip2 = pipelines["blip2"]
    captions = [_one_line(text) for text in blip2.caption(images)]
    answers = {role: [_one_line(a) for a in pipe.answer(images, questions)] for role, pipe in pipelines.items()}

    labels = [label for label in paths.labels.read_text(encoding="utf-8").split("\n") if label]
    present = [label for label in labels if any((paths.classification_root / label).glob("*.png"))]
    class_images = [
        (sorted((paths.classification_root / label).glob("*.png"))[0], label)
        for label in present[:: max(1, len(present) // 4)][:4]
    ]
    predictions = blip2.classify([p for p, _ in class_images], labels, hypothesis_template=CLASS_TEMPLATE)
    classified = [
        (image, truth, pred[0]["label"], float(pred[0]["score"]))
        for (image, truth), pred in zip(class_images, predictions)
    ]

    gallery = sorted(paths.image_root.glob("test/*.png"))[:24] or images
    captions_file = json.loads(paths.coco_captions.read_text(encoding="utf-8"))
    by_image = {record["image"]: record["caption"] for record in captions_file}
    query_image = gallery[min(5, len(gallery) - 1)]
    query = by_image.get(f"test/{query_image.name}")
    if isinstance(query, list):
        query = query[0]
    query = query or captions[0]
    found = blip2.retrieve(gallery, [query], k=min(3, len(gallery)))["text_to_image"][0]
    retrieved = [(gallery[hit["index"]], float(hit["score"])) for hit in found]
    return Showcase(
        images, captions, questions, [t for _, _, t in picked], answers, classified, query, retrieved, query_image
    )


def format_showcase(shown: Showcase) -> str:
    """The showcase as readable tables."""
    from vlkit.metrics.report import format_table

    roles = list(shown.answers)
    parts = ["Captions (shapes-blip2):"]
    parts.append(
        format_table([[p.name, c] for p, c in zip(shown.images, shown.captions)], headers=["image", "caption"])
    )
    parts.append("\nQuestions:")
    rows = [
        [p.name, q, t, *(shown.answers[r][i] for r in roles)]
        for i, (p, q, t) in enumerate(zip(shown.images, shown.questions, shown.truths))
    ]
    parts.append(format_table(rows, headers=["image", "question", "truth", *(MODELS[r] for r in roles)]))
    parts.append(f"\nZero-shot classification (shapes-blip2, template {CLASS_TEMPLATE!r}):")
    parts.append(
        format_table(
            [[p.name, t, y, f"{s:.2f}"] for p, t, y, s in shown.classified],
            headers=["image", "true class", "predicted", "probability"],
        )
    )
    parts.append(
        f"\nText -> image retrieval (shapes-blip2), query {shown.query!r} (written for {shown.query_image.name}):"
    )
    parts.append(
        format_table(
            [[i + 1, p.name, f"{s:.3f}"] for i, (p, s) in enumerate(shown.retrieved)],
            headers=["rank", "image", "score"],
        )
    )
    return "\n".join(parts)


def draw_grid(shown: Showcase, path: Path, *, cell: int = 192, columns: int = 4) -> Path:
    """A PNG grid of the showcase's test images with the generated caption and each model's answer."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    chars = max(8, cell // 6)
    lines_per_cell = 4 + len(shown.answers)  # caption (two lines), question, truth, one line per model
    line_height = 12
    text_height = lines_per_cell * line_height + 6
    rows = (len(shown.images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell, rows * (cell + text_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, image_path in enumerate(shown.images):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_height)
        with Image.open(image_path) as image:
            grid.paste(image.convert("RGB").resize((cell - 8, cell - 8), Image.NEAREST), (x + 4, y + 4))
        caption = textwrap.wrap(shown.captions[i], chars)[:2] or [""]
        text = [
            *caption,
            *([""] if len(caption) == 1 else []),
            f"Q: {shown.questions[i]}"[:chars],
            f"truth: {shown.truths[i]}"[:chars],
            *(
                f"{MODELS[role].removeprefix('shapes-')}: {answers[i]}"[:chars]
                for role, answers in shown.answers.items()
            ),
        ]
        for j, line in enumerate(text):
            draw.text((x + 4, y + cell + 2 + j * line_height), line, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


# ----------------------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------------------


def run_demo(
    *,
    out: Path,
    models: dict[str, str | os.PathLike] | None = None,
    test_images: int = DEMO_TEST_IMAGES,
    device: str = "cpu",
    baseline: bool = True,
    extra_columns: dict[str, dict[str, Path]] | None = None,
    checks: Sequence[Check] = CHECKS,
    showcase_images: int = 8,
    echo: Callable[[str], None] = print,
) -> dict[str, Scores]:
    """Show the models at work, evaluate them (and random-init copies), print the table, draw the grid.

    Args:
        out: the demo folder (``shapes/`` world, ``eval/``, ``grid.png``, ``metrics.json``).
        models: role -> bundled name or folder (default :data:`MODELS`).
        test_images: size of the test split.
        device: where the models run.
        baseline: also evaluate random-init copies of the models.
        extra_columns: more model sets to evaluate (column name -> role -> folder), e.g. the bundled models
            beside retrained ones.
        checks: the table's rows.
        showcase_images: test images shown (and drawn into the grid).
        echo: where the text goes.

    Returns:
        Column name -> scores.
    """
    from vlkit.api import load

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    folders = {role: model_folder(name) for role, name in (models or MODELS).items()}
    world = ensure_world(out / "shapes", test_images=test_images)
    pipelines = {role: load(folder, device=device) for role, folder in folders.items()}
    shown = showcase(pipelines, world, n=showcase_images)
    echo(format_showcase(shown))
    grid = draw_grid(shown, out / "grid.png")
    del pipelines

    columns: dict[str, Scores] = {
        "trained": evaluate_models(folders, world, out=out / "eval" / "trained", device=device, checks=checks)
    }
    for name, others in (extra_columns or {}).items():
        columns[name] = evaluate_models(others, world, out=out / "eval" / name, device=device, checks=checks)
    if baseline:
        with tempfile.TemporaryDirectory(prefix="vlkit-demo-random-") as tmp:
            random = {role: random_init_copy(folder, Path(tmp) / role) for role, folder in folders.items()}
            columns["random init"] = evaluate_models(
                random, world, out=out / "eval" / "random-init", device=device, checks=checks
            )
    echo(f"\nEvaluation on the shapes test split ({test_images} images, {world}):")
    echo(format_scores(columns, checks))
    document = {
        "models": {role: str(folder) for role, folder in folders.items()},
        "test_images": test_images,
        "columns": {name: scores.values for name, scores in columns.items()},
        "floors": {check.label: check.floor for check in CHECKS},
    }
    (out / "metrics.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    echo(f"\nwrote {grid} and {out / 'metrics.json'} ({time.perf_counter() - start:.0f} s)")
    return columns


# ----------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RetrainResult:
    """What :func:`retrain` made: the model of each role and the wall time of each step."""

    models: dict[str, Path]
    seconds: dict[str, float]


def retrain(
    out: Path,
    *,
    recipes: Path | None = None,
    quick: bool = False,
    train_images: int | None = None,
    extra_overrides: Sequence[str] = (),
    jobs: int = 2,
    echo: Callable[[str], None] = print,
) -> RetrainResult:
    """Run the whole shapes pipeline from scratch into ``out`` (``data/``, ``runs/``).

    Args:
        out: the pipeline folder.
        recipes: the shapes recipes (default ``configs/shapes`` of the source checkout).
        quick: the reduced pipeline (a small world, :data:`QUICK_STEPS` steps per stage): proves the recipes
            run end to end, not that they learn.
        train_images: train images of the main world (default its :data:`WORLDS` size, or the quick size); the
            other worlds keep theirs.
        extra_overrides: ``--set`` overrides for every stage.
        jobs: stages trained at the same time (each a ``vlkit train`` process; see :func:`run_stages`).
        echo: where progress lines go.

    Returns:
        The exported model folder of each demo role and the wall time of every step.
    """
    from vlkit.data.tokenizers import build_shapes_tokenizers
    from vlkit.training.recipe import load_recipe

    recipes = Path(recipes) if recipes is not None else recipes_dir()
    missing = [stage.recipe for stage in STAGES if stage.recipe and not (recipes / stage.recipe).is_file()]
    if missing:
        raise ConfigError(
            f"{recipes}: missing shapes recipes {', '.join(missing)} (--retrain needs vlkit's configs/shapes; "
            "run it from a source checkout or pass --recipes DIR)"
        )
    out = Path(out)
    data, runs = out / "data", out / "runs"
    seconds: dict[str, float] = {}
    begin = time.perf_counter()

    t = time.perf_counter()
    n_train = train_images or (QUICK_TRAIN_IMAGES if quick else WORLDS["data"])
    small = 16 if quick else 200
    ensure_world(data, test_images=small, train_images=n_train, val_images=small)
    seconds["data"] = time.perf_counter() - t
    echo(f"[data] shapes world with {n_train} train images at {data} ({seconds['data']:.0f} s)")

    t = time.perf_counter()
    if not (data / "tokenizers" / "qformer").is_dir():
        build_shapes_tokenizers(data, data / "tokenizers")
    seconds["tokenizers"] = time.perf_counter() - t
    echo(f"[tokenizers] {data / 'tokenizers'} ({seconds['tokenizers']:.0f} s)")

    commands = {}
    for stage in STAGES:
        world = out / stage.world
        if stage.recipe is None:  # another world, made beside the first stages
            images = QUICK_TRAIN_IMAGES if quick else WORLDS[stage.world]
            commands[stage.name] = ["data", "shapes", str(world), "--train-images", str(images)]
            commands[stage.name] += ["--images", str(small), "--quiet"]
            continue
        overrides = [f"task.data_root={world}", *_models_root(recipes / stage.recipe, runs)]
        if world != data:  # one tokenizer for the whole pipeline: the main world's
            overrides.append(f"task.tokenizer={data / 'tokenizers' / 'qformer'}")
        overrides += extra_overrides
        if quick:
            overrides += [f"run.max_steps={QUICK_STEPS}", *stage.quick]
        load_recipe(recipes / stage.recipe, overrides)  # every recipe is checked before anything trains
        commands[stage.name] = ["train", str(recipes / stage.recipe), "--output", str(runs / stage.name)] + [
            arg for override in overrides for arg in ("--set", override)
        ]
    seconds.update(run_stages(commands, runs, jobs=jobs, echo=echo))
    models = {role: runs / run / "model" for role, run in ROLE_RUNS.items()}
    for role, folder in models.items():
        if not (folder / "config.yaml").is_file():
            raise DataError(f"the pipeline exported no {role} model at {folder}")
    seconds["total"] = time.perf_counter() - begin  # wall time: independent stages overlap
    return RetrainResult(models, seconds)


def run_stages(
    commands: dict[str, list[str]], runs: Path, *, jobs: int = 2, echo: Callable[[str], None] = print
) -> dict[str, float]:
    """Run the ``vlkit`` command of every stage (``vlkit train``, or ``vlkit data shapes``) as its own process,
    up to ``jobs`` at a time, each starting once the stages it comes ``after`` have finished (in :data:`STAGES`
    order).

    The models are small, so two single-threaded processes use two cores far better than one process with two
    threads; each process gets ``OMP_NUM_THREADS = cores // jobs``. Output goes to ``runs/NAME.log``.

    Returns:
        The wall time of each stage.

    Raises:
        DataError: a stage failed (its log's last lines are in the message); the others are stopped.
    """
    import subprocess
    import sys

    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs}")
    runs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])  # vlkit importable in the children, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    stages = [stage for stage in STAGES if stage.name in commands]
    pending = list(stages)
    running: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    done: set[str] = set()
    seconds: dict[str, float] = {}
    try:
        while pending or running:
            for stage in list(pending):
                if len(running) >= jobs:
                    break
                if all(dep in done or dep not in commands for dep in stage.after):
                    pending.remove(stage)
                    log = open(runs / f"{stage.name}.log", "w", encoding="utf-8")  # noqa: SIM115 - closed below
                    echo(f"[{stage.name}] vlkit {' '.join(commands[stage.name][:4])} (log {runs / stage.name}.log)")
                    process = subprocess.Popen(
                        [sys.executable, "-m", "vlkit", *commands[stage.name]],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                    running[stage.name] = (process, time.perf_counter(), log)
            if not running:
                raise DataError(f"stages {[s.name for s in pending]} wait for stages that never ran")
            time.sleep(0.2)
            for name, (process, start, log) in list(running.items()):
                if process.poll() is None:
                    continue
                log.close()
                del running[name]
                seconds[name] = time.perf_counter() - start
                if process.returncode != 0:
                    tail = (runs / f"{name}.log").read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
                    raise DataError(f"stage {name} failed (exit {process.returncode}):\n" + "\n".join(tail))
                done.add(name)
                echo(f"[{name}] done in {seconds[name]:.0f} s")
    finally:
        for process, _, log in running.values():
            process.kill()
            process.wait()
            log.close()
    return seconds


def _models_root(recipe: Path, runs: Path) -> list[str]:
    """``task.models_root=RUNS`` for recipes that start from earlier runs (those that have the key)."""
    import yaml

    task = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("task") or {}
    return [f"task.models_root={runs}"] if "models_root" in task else []


def install_bundle(models: dict[str, Path], *, assets: Path | None = None) -> dict[str, int]:
    """Copy the retrained models into the package's bundled-model folder (maintainers: before a release).

    Only the files a model folder is made of travel (config, weights, tokenizers, label files), not the run's
    checkpoints. Returns the bytes of each installed folder.
    """
    from vlkit.api import ASSETS_DIR

    assets = assets or ASSETS_DIR
    sizes = {}
    for role, folder in models.items():
        target = assets / MODELS[role]
        tmp = assets / f".{MODELS[role]}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(folder, tmp)
        for path in tmp.rglob("*"):  # exports are written private (mkstemp); package data is for everyone
            path.chmod(0o755 if path.is_dir() else 0o644)
        config = tmp / "config.yaml"  # provenance paths of this machine's pipeline folder read OUT/... instead
        pipeline_root = str(Path(folder).resolve().parents[2])
        config.write_text(config.read_text(encoding="utf-8").replace(pipeline_root, "OUT"), encoding="utf-8")
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        sizes[MODELS[role]] = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    return sizes


def results_markdown(columns: dict[str, Scores], seconds: dict[str, float] | None = None, *, test_images: int) -> str:
    """The metrics table of ``configs/shapes/README.md`` (written by ``vlkit demo --retrain OUT --install``)."""
    lines = [
        f"Metrics on the shapes test split ({test_images} images, seed {WORLD_SEED}), written by "
        "`vlkit demo --retrain OUT --install`:",
        "",
        "| metric | " + " | ".join(columns) + " | floor |",
        "| --- | " + " | ".join("---:" for _ in columns) + " | ---: |",
    ]
    for check in CHECKS:
        cells = []
        for scores in columns.values():
            value = scores.values.get(check.label)
            cells.append("-" if value is None else (f"{value:.3f}" if check.task == "caption" else f"{value:.1f}"))
        lines.append(f"| {check.label} | " + " | ".join(cells) + f" | {check.floor:g} |")
    if seconds:
        lines += ["", "Wall time of the pipeline (seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())]
    return "\n".join(lines) + "\n"
