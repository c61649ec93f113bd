"""The shapes world: a seeded synthetic visual world written in the file formats of real datasets.

Each image shows 1-3 non-overlapping objects on a plain or lightly textured background. An object has a
shape (circle, square, triangle, diamond, cross), a colour (red, green, blue, yellow, purple, orange) and a
size (small, large); within one image no two objects share a shape or a colour, so "the circle" and "the red
object" always name exactly one thing. Pairs of objects are placed so that one axis clearly dominates their
offset, so "left of / right of / above / below" is never ambiguous.

From those scenes :func:`generate_shapes_world` writes, for the splits train/val/test:

- ``images/{split}/shapes_{split}_{id:06d}.png`` (ids are unique across splits),
- COCO-Karpathy caption annotations as LAVIS ships them, plus COCO-format ground truth for scoring,
- Flickr30k-style retrieval annotations (val/test image descriptions are unique within the split),
- VQAv2 question and annotation files (10 answers per question; question types colour, shape, count,
  position, yes/no; a few annotators spell answers differently, so answer normalisation matters),
- an image-folder classification set of single-object images (60 classes "{size} {colour} {shape}"),
- instruction-tuning JSONL mixing captioning, VQA and "describe the X" instructions,
- ``scenes/scenes_{split}.json`` (the ground truth behind every file), ``manifest.json`` and ``README.md``.

The same arguments give byte-identical output: every random draw comes from ``random.Random`` objects seeded
from (seed, split, purpose) strings, PNGs carry no metadata, and JSON is written in a fixed order. (Identity
is promised for one installation; a different zlib or Pillow may compress the same pixels differently.)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from vlkit.errors import DataError

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 65),
    "blue": (40, 85, 215),
    "yellow": (235, 200, 30),
    "purple": (135, 60, 185),
    "orange": (245, 130, 25),
}
SIZES: dict[str, float] = {"small": 0.2, "large": 0.32}  # bounding-box side as a fraction of the image side
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (248, 248, 248),
    "gray": (212, 212, 212),
    "cream": (243, 234, 212),
}
TEXTURES = ("plain", "noise", "stripes", "checks")
SPLITS = ("train", "val", "test")
CLASSES = tuple(sorted(f"{size} {colour} {shape}" for size in SIZES for colour in COLOURS for shape in SHAPES))

RELATIONS = ("to the left of", "to the right of", "above", "below")
_OPPOSITE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
_RELATION_ANSWER = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}
REGIONS = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))
_REGION_PHRASE = {
    "top left": "in the top left corner",
    "top": "at the top",
    "top right": "in the top right corner",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left corner",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}
_NUMBER_WORDS = {"0": "zero", "1": "one", "2": "two", "3": "three"}

_MARGIN = 0.04  # free border, fraction of the side
_GAP = 0.04  # minimum gap between bounding boxes
_DOMINANCE = 1.3  # a pair's main-axis offset is at least this times its other-axis offset
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down, for smooth edges
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeObject:
    """One object: attributes and the centre/side of its bounding box in pixels."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    side: float
    rgb: tuple[int, int, int]

    @property
    def name(self) -> str:
        """``"small red circle"``."""
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One image of the shapes world."""

    image_id: int
    split: str
    file: str  # relative to the images root
    width: int
    background: str
    texture: str
    objects: tuple[ShapeObject, ...]
    texture_seed: int

    def region(self, obj: ShapeObject) -> str:
        """Which of the 3x3 regions of the image holds the centre of ``obj``."""
        col = min(2, int(obj.x * 3 / self.width))
        row = min(2, int(obj.y * 3 / self.width))
        return REGIONS[row][col]

    def left_to_right(self) -> list[ShapeObject]:
        """The objects sorted by x (then y): the order every description uses."""
        return sorted(self.objects, key=lambda o: (o.x, o.y))


def relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where ``a`` is relative to ``b``: the dominant axis of their offset decides."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _place(rng: random.Random, sides: list[float], width: int) -> list[tuple[float, float]] | None:
    margin, gap = _MARGIN * width, _GAP * width
    placed: list[tuple[float, float, float]] = []
    for side in sides:
        lo, hi = margin + side / 2, width - margin - side / 2
        for _ in range(60):
            x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
            ok = True
            for px, py, ps in placed:
                dx, dy = abs(x - px), abs(y - py)
                reach = (side + ps) / 2 + gap
                if dx < reach and dy < reach:  # bounding boxes (plus gap) overlap
                    ok = False
                    break
                if max(dx, dy) < _DOMINANCE * min(dx, dy):  # diagonal: relation would be ambiguous
                    ok = False
                    break
            if ok:
                placed.append((x, y, side))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def sample_scene(
    rng: random.Random,
    width: int,
    image_id: int,
    split: str,
    file: str,
    n_objects: int | None = None,
    attributes: Sequence[tuple[str, str, str]] | None = None,
) -> Scene:
    """Draw one scene.

    Args:
        rng: the source of randomness (consumed deterministically).
        width: image side in pixels.
        image_id: the scene's image id.
        split: split name (recorded in the scene).
        file: the image path relative to the images root.
        n_objects: number of objects (1-3; drawn as 30% / 35% / 35% when None).
        attributes: fixed (size, colour, shape) per object instead of random ones.
    """
    background = rng.choice(list(BACKGROUNDS))
    texture = rng.choice(TEXTURES)
    texture_seed = rng.getrandbits(63)
    while True:
        if attributes is not None:
            attrs = list(attributes)
        else:
            count = n_objects or rng.choices((1, 2, 3), weights=(30, 35, 35))[0]
            shapes = rng.sample(SHAPES, count)
            colours = rng.sample(list(COLOURS), count)
            attrs = [(rng.choice(list(SIZES)), colour, shape) for shape, colour in zip(shapes, colours)]
        sides = [SIZES[size] * width for size, _, _ in attrs]
        # Place big objects first: they are the hard ones to fit.
        order = sorted(range(len(attrs)), key=lambda i: -sides[i])
        centres = _place(rng, [sides[i] for i in order], width)
        if centres is None:
            if attributes is not None:
                raise DataError(f"cannot place objects {attrs} in a {width}px image")
            continue
        objects = [None] * len(attrs)
        for i, (x, y) in zip(order, centres):
            size, colour, shape = attrs[i]
            jitter = tuple(int(np.clip(c + rng.randint(-8, 8), 0, 255)) for c in COLOURS[colour])
            objects[i] = ShapeObject(shape, colour, size, round(x, 3), round(y, 3), sides[i], jitter)
        return Scene(image_id, split, file, width, background, texture, tuple(objects), texture_seed)


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------


def _background(scene: Scene) -> np.ndarray:
    w = scene.width
    base = np.array(BACKGROUNDS[scene.background], dtype=np.int16)
    rng = np.random.default_rng(scene.texture_seed)
    yy, xx = np.mgrid[0:w, 0:w]
    period = max(4, w // 8)
    if scene.texture == "plain":
        delta = np.zeros((w, w), dtype=np.int16)
    elif scene.texture == "noise":
        delta = rng.integers(-9, 10, size=(w, w)).astype(np.int16)
    elif scene.texture == "stripes":
        direction = int(rng.integers(0, 3))
        coord = (xx, yy, xx + yy)[direction]
        delta = np.where((coord // (period // 2)) % 2 == 0, 7, -7).astype(np.int16)
    else:  # checks
        delta = np.where(((xx // period) + (yy // period)) % 2 == 0, 6, -6).astype(np.int16)
    return np.clip(base[None, None, :] + delta[:, :, None], 0, 255).astype(np.uint8)


def render_scene(scene: Scene) -> Image.Image:
    """Draw ``scene`` as an RGB image of side ``scene.width``."""
    k = _SUPERSAMPLE
    back = _background(scene)
    canvas = Image.fromarray(np.repeat(np.repeat(back, k, axis=0), k, axis=1), "RGB")
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        x, y, h = obj.x * k, obj.y * k, obj.side * k / 2
        if obj.shape == "circle":
            draw.ellipse((x - h, y - h, x + h, y + h), fill=obj.rgb)
        elif obj.shape == "square":
            s = h * 0.85  # a square of the full box looks much bigger than the other shapes
            draw.rectangle((x - s, y - s, x + s, y + s), fill=obj.rgb)
        elif obj.shape == "triangle":
            draw.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=obj.rgb)
        elif obj.shape == "diamond":
            draw.polygon([(x, y - h), (x + h, y), (x, y + h), (x - h, y)], fill=obj.rgb)
        elif obj.shape == "cross":
            t = h / 3
            draw.rectangle((x - h, y - t, x + h, y + t), fill=obj.rgb)
            draw.rectangle((x - t, y - h, x + t, y + h), fill=obj.rgb)
        else:  # pragma: no cover - SHAPES is closed
            raise DataError(f"unknown shape {obj.shape!r}")
    return canvas.reduce(k)


# ----------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------


def canonical_description(scene: Scene) -> str:
    """The one full description of a scene: every object, left to right, and how they are arranged."""
    objs = scene.left_to_right()
    if len(objs) == 1:
        return f"{_article(objs[0].name)} {_REGION_PHRASE[scene.region(objs[0])]}"
    a, b = objs[0], objs[1]
    text = f"{_article(a.name)} {relation(a, b)} {_article(b.name)}"
    if len(objs) == 3:
        c = objs[2]
        text += f" and {_article(c.name)} {relation(c, b)} the {b.shape}"
    return text


def _background_phrase(scene: Scene) -> str:
    kind = "" if scene.texture == "plain" else "textured "
    return f"{_article(kind + scene.background)} background"


def caption_pool(scene: Scene) -> list[str]:
    """Alternative captions of a scene (each names every object with size, colour and shape)."""
    objs = scene.left_to_right()
    names = [_article(o.name) for o in objs]
    bg = _background_phrase(scene)
    if len(objs) == 1:
        (n,) = names
        where = _REGION_PHRASE[scene.region(objs[0])]
        return [
            n,
            f"{n} on {bg}",
            f"there is {n} {where}",
            f"a picture of {n}",
            f"an image with {n} {where}",
            f"a single {objs[0].name}",
            f"one {objs[0].name} {where}",
            f"the image shows {n}",
        ]
    a, b = objs[0], objs[1]
    if len(objs) == 2:
        na, nb = names
        return [
            f"{nb} {relation(b, a)} {na}",
            f"{na} and {nb}",
            f"two shapes, {na} and {nb}",
            f"there is {na} {relation(a, b)} {nb}",
            f"a picture of {na} and {nb}",
            f"{nb} and {na} on {bg}",
            f"the image shows {nb} and {na}",
        ]
    c = objs[2]
    na, nb, nc = names
    return [
        f"{na}, {nb} and {nc}",
        f"three shapes, {na}, {nb} and {nc}",
        f"{nb} {relation(b, a)} {na} and {relation(b, c)} {nc}",
        f"there are three shapes, {nc}, {na} and {nb}",
        f"a picture of {na}, {nb} and {nc} on {bg}",
        f"{nc} {relation(c, a)} {na}, and {nb}",
        f"the image shows {nb}, {nc} and {na}",
    ]


def _raw_style(rng: random.Random, text: str) -> str:
    # Real caption files mix "A dog runs." and "a dog runs"; the caption processor must cope with both.
    if rng.random() < 0.5:
        return text[0].upper() + text[1:] + "."
    return text


def captions(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """``n`` distinct raw captions; the first is the canonical description."""
    pool = caption_pool(scene)
    chosen = [canonical_description(scene)] + rng.sample(pool, n - 1)
    return [_raw_style(rng, text) for text in chosen]


@dataclass(frozen=True)
class Question:
    """One VQA question about a scene, with its canonical answer and the official-style type fields."""

    text: str
    answer: str
    question_type: str  # colour | shape | count | position | yes/no
    answer_type: str  # "yes/no" | "number" | "other" (VQAv2's answer types)


def _question_colour(scene: Scene, rng: random.Random) -> Question:
    obj = rng.choice(scene.objects)
    template = rng.choice(["what color is the {s}?", "what is the color of the {s}?", "which color does the {s} have?"])
    return Question(template.format(s=obj.shape), obj.colour, "colour", "other")


def _question_shape(scene: Scene, rng: random.Random) -> Question:
    obj = rng.choice(scene.objects)
    template = rng.choice(["what shape is the {c} object?", "what is the {c} shape?", "which shape is {c}?"])
    return Question(template.format(c=obj.colour), obj.shape, "shape", "other")


def _question_count(scene: Scene, rng: random.Random) -> Question:
    if rng.random() < 0.6:
        text = rng.choice(["how many shapes are there?", "how many objects are in the image?"])
        return Question(text, str(len(scene.objects)), "count", "number")
    size = rng.choice(list(SIZES))
    count = sum(o.size == size for o in scene.objects)
    return Question(f"how many {size} shapes are there?", str(count), "count", "number")


def _question_position(scene: Scene, rng: random.Random) -> Question:
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        text = rng.choice(["where is the {s}?", "where in the image is the {s}?"]).format(s=obj.shape)
        return Question(text, scene.region(obj), "position", "other")
    a, b = rng.sample(list(scene.objects), 2)
    text = rng.choice(["where is the {a} relative to the {b}?", "where is the {a} compared to the {b}?"])
    return Question(text.format(a=a.shape, b=b.shape), _RELATION_ANSWER[relation(a, b)], "position", "other")


def _question_yes_no(scene: Scene, rng: random.Random) -> Question:
    present = {(o.colour, o.shape) for o in scene.objects}
    if len(scene.objects) >= 2 and rng.random() < 0.4:
        a, b = rng.sample(list(scene.objects), 2)
        truth = relation(a, b)
        asked = truth if rng.random() < 0.5 else _OPPOSITE[truth]
        return Question(
            f"is the {a.shape} {asked} the {b.shape}?", "yes" if asked == truth else "no", "yes/no", "yes/no"
        )
    if rng.random() < 0.5:
        colour, shape = rng.choice(sorted(present))
    else:  # an absent object that shares one attribute with a present one, so looking matters
        ref_colour, ref_shape = rng.choice(sorted(present))
        options = [(ref_colour, s) for s in SHAPES] + [(c, ref_shape) for c in COLOURS]
        colour, shape = rng.choice([pair for pair in options if pair not in present])
    answer = "yes" if (colour, shape) in present else "no"
    return Question(f"is there {_article(colour)} {shape}?", answer, "yes/no", "yes/no")


_QUESTION_MAKERS = {
    "colour": _question_colour,
    "shape": _question_shape,
    "count": _question_count,
    "position": _question_position,
    "yes/no": _question_yes_no,
}


def questions(scene: Scene, rng: random.Random, n: int = 3) -> list[Question]:
    """``n`` distinct questions about ``scene``, of types drawn without replacement while possible."""
    kinds = rng.sample(list(_QUESTION_MAKERS), min(n, len(_QUESTION_MAKERS)))
    kinds += [rng.choice(list(_QUESTION_MAKERS)) for _ in range(n - len(kinds))]
    out: list[Question] = []
    for kind in kinds:
        for _ in range(20):
            q = _QUESTION_MAKERS[kind](scene, rng)
            if all(q.text != other.text for other in out):
                out.append(q)
                break
    return out


def _variant(answer: str, rng: random.Random) -> str:
    """A spelling of ``answer`` that VQA answer normalisation maps back to it."""
    if answer in _NUMBER_WORDS:
        return rng.choice([_NUMBER_WORDS[answer], _NUMBER_WORDS[answer].capitalize()])
    if " " in answer:
        return rng.choice([answer.replace(" ", "-"), answer.capitalize()])
    return rng.choice([answer.capitalize(), answer + "."])


def _wrong_answer(q: Question, rng: random.Random) -> str:
    pools = {
        "colour": list(COLOURS),
        "shape": list(SHAPES),
        "count": ["0", "1", "2", "3"],
        "yes/no": ["yes", "no"],
        "position": ["left", "right", "above", "below"]
        if q.answer in _RELATION_ANSWER.values()
        else [r for row in REGIONS for r in row],
    }
    return rng.choice([a for a in pools[q.question_type] if a != q.answer])


def annotator_answers(q: Question, rng: random.Random) -> list[dict[str, Any]]:
    """Ten VQAv2-style human answers: mostly unanimous, sometimes spelled differently, rarely wrong."""
    answers = [q.answer] * 10
    confidence = ["yes"] * 10
    if rng.random() < 0.25:
        for i in rng.sample(range(10), rng.randint(1, 3)):
            answers[i] = _variant(q.answer, rng)
    if rng.random() < 0.08:
        i = rng.randrange(10)
        answers[i], confidence[i] = _wrong_answer(q, rng), "maybe"
    return [
        {"answer": a, "answer_confidence": c, "answer_id": i + 1} for i, (a, c) in enumerate(zip(answers, confidence))
    ]


_CAPTION_INSTRUCTIONS = (
    "describe the image briefly.",
    "write a short caption for this image.",
    "what does the image show?",
    "give a one sentence description of the picture.",
    "caption this image.",
)
_VQA_INSTRUCTIONS = ("{q}", "question: {q} short answer:", "answer the question briefly. {q}", "{q} answer in a word.")
_DESCRIBE_INSTRUCTIONS = (
    "describe the {shape}.",
    "tell me about the {shape}.",
    "what can you say about the {colour} object?",
)


def _plain(text: str) -> str:
    return text.rstrip(".").lower()


def instructions(scene: Scene, caps: Sequence[str], qs: Sequence[Question], rng: random.Random) -> list[dict[str, str]]:
    """Three instruction-tuning records for a scene: caption it, answer a question, describe one object."""
    records = [
        {"instruction": rng.choice(_CAPTION_INSTRUCTIONS), "response": _plain(rng.choice(list(caps)))},
    ]
    if qs:
        q = rng.choice(list(qs))
        records.append({"instruction": rng.choice(_VQA_INSTRUCTIONS).format(q=q.text), "response": q.answer})
    obj = rng.choice(scene.objects)
    if len(scene.objects) == 1:
        where = _REGION_PHRASE[scene.region(obj)]
    else:
        other = rng.choice([o for o in scene.objects if o is not obj])
        where = f"{relation(obj, other)} the {other.shape}"
    prompt = rng.choice(_DESCRIBE_INSTRUCTIONS).format(shape=obj.shape, colour=obj.colour)
    records.append({"instruction": prompt, "response": f"it is {_article(obj.name)} {where}"})
    return [{"image": scene.file, **r} for r in records]


# ----------------------------------------------------------------------------------------------------------
# Writing the world
# ----------------------------------------------------------------------------------------------------------


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # No pnginfo, no timestamps, fixed compression: the bytes depend only on the pixels.
    image.save(path, format="PNG", compress_level=6, optimize=False)


def _write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=indent, ensure_ascii=False, separators=(",", ": ") if indent else (",", ":"))
    path.write_text(text + "\n", encoding="utf-8")


def _rng(seed: int, *parts: object) -> random.Random:
    return random.Random(":".join(["vlkit-shapes", str(seed), *map(str, parts)]))


@dataclass
class _SplitData:
    scenes: list[Scene]
    captions: list[list[str]]
    questions: list[list[Question]]


def _make_split(
    split: str, count: int, first_id: int, id_width: int, size: int, seed: int, n_questions: int, unique: bool
) -> _SplitData:
    rng = _rng(seed, split, "scenes")
    text_rng = _rng(seed, split, "text")
    data = _SplitData([], [], [])
    seen: set[str] = set()
    for index in range(count):
        image_id = first_id + index
        file = f"{split}/shapes_{split}_{image_id:0{id_width}d}.png"
        for _ in range(2000):
            scene = sample_scene(rng, size, image_id, split, file)
            canonical = canonical_description(scene)
            if not unique or canonical not in seen:
                break
        else:
            raise DataError(
                f"cannot draw {count} images with distinct descriptions for split {split!r}; ask for fewer images"
            )
        seen.add(canonical)
        data.scenes.append(scene)
        data.captions.append(captions(scene, text_rng))
        data.questions.append(questions(scene, text_rng, n_questions))
    return data


def _scene_record(scene: Scene, caps: Sequence[str]) -> dict[str, Any]:
    return {
        "image_id": scene.image_id,
        "image": scene.file,
        "background": scene.background,
        "texture": scene.texture,
        "description": canonical_description(scene),
        "captions": list(caps),
        "objects": [
            {"shape": o.shape, "colour": o.colour, "size": o.size, "x": o.x, "y": o.y, "region": scene.region(o)}
            for o in scene.left_to_right()
        ],
    }


def _iter_with_progress(items: Sequence[Any], desc: str, progress: bool) -> Iterator[Any]:
    return iter(tqdm(items, desc=desc, disable=not progress, leave=False, unit="img"))


def generate_shapes_world(
    out: str | os.PathLike,
    *,
    images: int = 200,
    size: int = 64,
    seed: int = 0,
    train_images: int | None = None,
    val_images: int | None = None,
    test_images: int | None = None,
    questions_per_image: int = 3,
    progress: bool = False,
) -> dict[str, Any]:
    """Write a shapes world to ``out`` and return its manifest.

    ``out`` must be absent, empty, or a previous shapes world (which is replaced). The world is built in a
    temporary sibling folder and renamed into place, so a failed run leaves nothing half-written.

    Args:
        out: destination folder.
        images: images per split (train, val, test) unless given per split.
        size: image side in pixels (>= 32).
        seed: random seed; the same arguments give byte-identical files.
        train_images: images in the train split (default ``images``).
        val_images: images in the val split (default ``images``).
        test_images: images in the test split (default ``images``).
        questions_per_image: VQA questions asked per image (1-10; fewer when an image has fewer distinct ones).
        progress: show tqdm progress bars.

    Returns:
        The manifest (also written to ``out/manifest.json``).

    Raises:
        DataError: for bad arguments or an ``out`` folder that holds something else.
    """
    counts = {
        "train": images if train_images is None else train_images,
        "val": images if val_images is None else val_images,
        "test": images if test_images is None else test_images,
    }
    if any(n < 1 for n in counts.values()):
        raise DataError(f"every split needs at least one image, got {counts}")
    if size < 32:
        raise DataError(f"image size must be at least 32 px, got {size}")
    if not 1 <= questions_per_image <= 10:
        raise DataError(f"questions_per_image must be between 1 and 10, got {questions_per_image}")
    out = Path(out)
    _check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the world is ordinary data
    try:
        manifest = _write_world(tmp, counts, size, seed, questions_per_image, progress)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _check_destination(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if not any(out.iterdir()):
        return
    manifest = out / "manifest.json"
    try:
        previous = json.loads(manifest.read_text(encoding="utf-8"))
        if previous.get("generator") == "vlkit data shapes":
            return
    except (OSError, ValueError, AttributeError):
        pass
    raise DataError(f"{out}: folder is not empty and is not a shapes world; choose a new or empty folder")


def _write_world(
    root: Path, counts: dict[str, int], size: int, seed: int, n_questions: int, progress: bool
) -> dict[str, Any]:
    total = sum(counts.values())
    id_width = max(6, len(str(total)))
    first_ids = {"train": 1, "val": 1 + counts["train"], "test": 1 + counts["train"] + counts["val"]}
    splits = {
        split: _make_split(
            split, counts[split], first_ids[split], id_width, size, seed, n_questions, unique=split != "train"
        )
        for split in SPLITS
    }
    files: dict[str, str] = {}
    stats: dict[str, dict[str, int]] = {}

    for split, data in splits.items():
        for scene in _iter_with_progress(data.scenes, f"{split} images", progress):
            _save_png(render_scene(scene), root / "images" / scene.file)

        # COCO-Karpathy (LAVIS): train has one entry per caption; val/test one entry per image.
        name = f"annotations/coco_karpathy_{split}.json"
        if split == "train":
            entries = [
                {"caption": cap, "image": s.file, "image_id": f"shapes_{s.image_id}"}
                for s, caps in zip(data.scenes, data.captions)
                for cap in caps
            ]
        else:
            entries = [{"image": s.file, "caption": caps} for s, caps in zip(data.scenes, data.captions)]
        _write_json(root / name, entries)
        files[name] = f"COCO-Karpathy {split} captions (LAVIS format)"
        if split != "train":
            gt_name = f"annotations/coco_karpathy_{split}_gt.json"
            _write_json(root / gt_name, _coco_ground_truth(data))
            files[gt_name] = f"COCO-format caption ground truth of {split} (pycocoevalcap)"

        # Flickr30k-style retrieval: same shapes as the COCO files.
        flickr = f"annotations/flickr30k_{split}.json"
        _write_json(root / flickr, entries)
        files[flickr] = f"Flickr30k-style {split} retrieval annotations"

        # VQAv2 pair.
        q_name, a_name = f"vqa/v2_OpenEnded_shapes_{split}_questions.json", f"vqa/v2_shapes_{split}_annotations.json"
        q_json, a_json = _vqa_files(split, data, _rng(seed, split, "answers"))
        _write_json(root / q_name, q_json)
        _write_json(root / a_name, a_json)
        files[q_name] = f"VQAv2 {split} questions"
        files[a_name] = f"VQAv2 {split} annotations (10 answers each)"

        # Instruction tuning.
        i_name = f"instruct/instruct_{split}.jsonl"
        inst_rng = _rng(seed, split, "instructions")
        records = [
            r
            for s, caps, qs in zip(data.scenes, data.captions, data.questions)
            for r in instructions(s, caps, qs, inst_rng)
        ]
        (root / i_name).parent.mkdir(parents=True, exist_ok=True)
        (root / i_name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        files[i_name] = f"instruction-tuning records of {split} (JSON lines: image, instruction, response)"

        # Ground truth of every scene.
        s_name = f"scenes/scenes_{split}.json"
        _write_json(root / s_name, [_scene_record(s, caps) for s, caps in zip(data.scenes, data.captions)])
        files[s_name] = f"ground truth of the {split} scenes (objects, positions, description)"

        n_classification = _write_classification(root, split, counts[split], size, seed, progress)
        stats[split] = {
            "images": len(data.scenes),
            "captions": sum(len(c) for c in data.captions),
            "questions": sum(len(q) for q in data.questions),
            "instructions": len(records),
            "classification_images": n_classification,
        }

    (root / "classification" / "labels.txt").write_text("".join(c + "\n" for c in CLASSES), encoding="utf-8")
    files["classification/labels.txt"] = "class names, one per line; line number = label (sorted folder order)"

    manifest = {
        "generator": "vlkit data shapes",
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "image_size": size,
        "image_root": "images",
        "vqa_image_template": f"{{data_subtype}}/shapes_{{data_subtype}}_{{image_id:0{id_width}d}}.png",
        "classification_root": "classification",
        "num_classes": len(CLASSES),
        "splits": stats,
        "files": dict(sorted(files.items())),
        "vocabulary": {"shapes": list(SHAPES), "colours": list(COLOURS), "sizes": list(SIZES)},
    }
    _write_json(root / "manifest.json", manifest, indent=2)
    (root / "README.md").write_text(_readme(manifest), encoding="utf-8")
    return manifest


def _coco_ground_truth(data: _SplitData) -> dict[str, Any]:
    annotations, next_id = [], 1
    for scene, caps in zip(data.scenes, data.captions):
        for cap in caps:
            annotations.append({"image_id": scene.image_id, "caption": cap, "id": next_id})
            next_id += 1
    return {
        "info": {"description": "vlkit shapes world caption ground truth"},
        "licenses": [],
        "type": "captions",
        "images": [{"id": s.image_id, "file_name": s.file} for s in data.scenes],
        "annotations": annotations,
    }


def _vqa_files(split: str, data: _SplitData, rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    qs, anns = [], []
    for scene, scene_questions in zip(data.scenes, data.questions):
        for k, q in enumerate(scene_questions):
            qid = scene.image_id * 1000 + k
            qs.append({"image_id": scene.image_id, "question": q.text, "question_id": qid})
            anns.append(
                {
                    "question_id": qid,
                    "image_id": scene.image_id,
                    "question_type": q.question_type,
                    "answer_type": q.answer_type,
                    "answers": annotator_answers(q, rng),
                    "multiple_choice_answer": q.answer,
                }
            )
    info = {"description": "vlkit shapes world VQA", "version": "2.0"}
    common = {"info": info, "license": {"name": "CC0"}, "data_type": "shapes", "data_subtype": split}
    return {**common, "task_type": "Open-Ended", "questions": qs}, {**common, "annotations": anns}


def _write_classification(root: Path, split: str, count: int, size: int, seed: int, progress: bool) -> int:
    rng = _rng(seed, split, "classification")
    base = root / "classification" / split
    for name in CLASSES:
        (base / name).mkdir(parents=True, exist_ok=True)
    # Cycle through a fresh permutation of the classes so every class is (nearly) equally frequent.
    labels: list[str] = []
    while len(labels) < count:
        labels += rng.sample(CLASSES, len(CLASSES))
    for index in _iter_with_progress(range(count), f"{split} classification", progress):
        size_word, colour, shape = labels[index].split(" ")
        file = f"{labels[index]}/{split}_{index:06d}.png"
        scene = sample_scene(rng, size, index, split, file, attributes=[(size_word, colour, shape)])
        _save_png(render_scene(scene), base / file)
    return count


def _readme(manifest: dict[str, Any]) -> str:
    lines = [
        "# shapes world",
        "",
        f"Written by `vlkit data shapes` (seed {manifest['seed']}, {manifest['image_size']} px). Re-running with the",
        "same arguments reproduces every byte. Images live under `images/`; every annotation path is relative to",
        "it. Load the files with `vlkit.data` (CaptionDataset, RetrievalDataset, VQADataset, ImageFolderDataset,",
        "InstructionDataset).",
        "",
        "| split | images | captions | questions | instructions | classification images |",
        "|---|---|---|---|---|---|",
    ]
    for split, s in manifest["splits"].items():
        lines.append(
            f"| {split} | {s['images']} | {s['captions']} | {s['questions']} | {s['instructions']} | "
            f"{s['classification_images']} |"
        )
    lines += ["", "| file | contents |", "|---|---|"]
    lines += [f"| `{name}` | {what} |" for name, what in manifest["files"].items()]
    lines += [
        "",
        f"VQA image files: `images/{manifest['vqa_image_template']}` (from each question's `image_id`).",
        f"Classification: `classification/{{split}}/{{label}}/*.png`, {manifest['num_classes']} labels listed in",
        "`classification/labels.txt`.",
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class ShapesPaths:
    """Where one split of a shapes world keeps each file (see :func:`shapes_paths`)."""

    root: Path
    split: str
    image_root: Path
    coco_captions: Path
    coco_ground_truth: Path | None  # None for train
    flickr: Path
    vqa_questions: Path
    vqa_annotations: Path
    vqa_image_template: str
    classification_root: Path
    labels: Path
    instructions: Path
    scenes: Path


def shapes_paths(root: str | os.PathLike, split: str) -> ShapesPaths:
    """The files of ``split`` in the shapes world at ``root``, checked against its manifest.

    Raises:
        DataError: if ``root`` is not a shapes world or ``split`` is unknown.
    """
    root = Path(root)
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{root}: not a shapes world (cannot read manifest.json: {err})") from err
    if not isinstance(manifest, dict) or manifest.get("generator") != "vlkit data shapes":
        raise DataError(f"{root}/manifest.json: not written by 'vlkit data shapes'")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    ann = root / "annotations"
    return ShapesPaths(
        root=root,
        split=split,
        image_root=root / manifest["image_root"],
        coco_captions=ann / f"coco_karpathy_{split}.json",
        coco_ground_truth=None if split == "train" else ann / f"coco_karpathy_{split}_gt.json",
        flickr=ann / f"flickr30k_{split}.json",
        vqa_questions=root / "vqa" / f"v2_OpenEnded_shapes_{split}_questions.json",
        vqa_annotations=root / "vqa" / f"v2_shapes_{split}_annotations.json",
        vqa_image_template=manifest["vqa_image_template"],
        classification_root=root / manifest["classification_root"] / split,
        labels=root / manifest["classification_root"] / "labels.txt",
        instructions=root / "instruct" / f"instruct_{split}.jsonl",
        scenes=root / "scenes" / f"scenes_{split}.json",
    )
