"""The shapes world: determinism, counts, uniqueness, and that pictures, captions and answers agree."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlkit.cli import main
from vlkit.data.shapes import CLASSES, COLOURS, SHAPES, SIZES, generate_shapes_world, relation, shapes_paths
from vlkit.errors import DataError
from vlkit.processors import blip_caption

N = 200  # the README command's --images


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The world the README's first command writes (``vlkit data shapes OUT --images 200``)."""
    out = tmp_path_factory.mktemp("readme") / "shapes"
    assert main(["data", "shapes", str(out), "--images", str(N)]) == 0
    return out


def load(path: Path):
    return json.loads(path.read_text())


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def nearest_colour(rgb) -> str:
    return min(COLOURS, key=lambda name: sum((int(a) - b) ** 2 for a, b in zip(rgb, COLOURS[name])))


# ------------------------------------------------------------------ determinism


def test_same_arguments_give_byte_identical_worlds(tmp_path):
    generate_shapes_world(tmp_path / "a", images=12, size=48, seed=3)
    generate_shapes_world(tmp_path / "b", images=12, size=48, seed=3)
    a, b = all_files(tmp_path / "a"), all_files(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 90
    assert [k for k in a if a[k] != b[k]] == []
    # Nothing records where or when it was written.
    assert not any(str(tmp_path).encode() in data for data in a.values())


def test_different_seed_gives_a_different_world(tmp_path):
    generate_shapes_world(tmp_path / "a", images=12, seed=3)
    generate_shapes_world(tmp_path / "b", images=12, seed=4)
    a, b = all_files(tmp_path / "a"), all_files(tmp_path / "b")
    differing = [k for k in a if a[k] != b.get(k)]
    assert "annotations/coco_karpathy_train.json" in differing
    assert "images/train/shapes_train_000001.png" in differing


def test_rerun_replaces_a_previous_world_but_never_other_folders(tmp_path, capsys):
    out = tmp_path / "w"
    generate_shapes_world(out, images=5, seed=1)
    (out / "images" / "stale.png").write_bytes(b"old")
    generate_shapes_world(out, images=4, seed=1)
    assert not (out / "images" / "stale.png").exists()
    assert load(out / "manifest.json")["splits"]["train"]["images"] == 4
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    assert main(["data", "shapes", str(other), "--images", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty and is not a shapes world" in err[0]
    assert (other / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "w"]  # no temporary folder left behind


@pytest.mark.parametrize(
    "args,message",
    [(["--images", "0"], "at least one image"), (["--size", "16"], "at least 32 px"), (["--test-images", "-1"], "")],
)
def test_bad_arguments_exit_2(tmp_path, capsys, args, message):
    assert main(["data", "shapes", str(tmp_path / "x"), *args]) == 2
    assert message in capsys.readouterr().err


def test_too_many_unique_descriptions_is_a_clear_error(tmp_path, monkeypatch):
    import vlkit.data.shapes as shapes

    monkeypatch.setattr(shapes, "canonical_description", lambda scene: "always the same")
    with pytest.raises(DataError, match="distinct descriptions"):
        generate_shapes_world(tmp_path / "x", images=2)


# ------------------------------------------------------------------ counts and formats


def test_counts_per_split(world):
    manifest = load(world / "manifest.json")
    assert manifest["generator"] == "vlkit data shapes" and manifest["image_size"] == 64
    for split in ("train", "val", "test"):
        stats = manifest["splits"][split]
        assert stats == {
            "images": N,
            "captions": 5 * N,
            "questions": 3 * N,
            "instructions": 3 * N,
            "classification_images": N,
        }
        pngs = sorted((world / "images" / split).glob("*.png"))
        assert len(pngs) == N
        image = Image.open(pngs[0])
        assert image.size == (64, 64) and image.mode == "RGB" and not image.info.get("tIME")
        coco = load(world / "annotations" / f"coco_karpathy_{split}.json")
        flickr = load(world / "annotations" / f"flickr30k_{split}.json")
        assert coco == flickr
        if split == "train":
            assert len(coco) == 5 * N
            assert all(set(e) == {"image", "caption", "image_id"} and isinstance(e["image_id"], str) for e in coco)
        else:
            assert len(coco) == N and all(len(e["caption"]) == 5 for e in coco)
        questions = load(world / "vqa" / f"v2_OpenEnded_shapes_{split}_questions.json")["questions"]
        annotations = load(world / "vqa" / f"v2_shapes_{split}_annotations.json")["annotations"]
        assert len(questions) == len(annotations) == 3 * N
        assert all(len(a["answers"]) == 10 for a in annotations)
        lines = (world / "instruct" / f"instruct_{split}.jsonl").read_text().splitlines()
        assert len(lines) == 3 * N
        assert sum(1 for _ in (world / "classification" / split).rglob("*.png")) == N
    assert (world / "README.md").read_text().startswith("# shapes world")
    for name in manifest["files"]:
        assert (world / name).is_file(), name


def test_image_ids_are_unique_and_the_file_name_suffix(world):
    ids = []
    for split in ("train", "val", "test"):
        for scene in load(world / "scenes" / f"scenes_{split}.json"):
            assert int(re.search(r"_(\d+)\.png$", scene["image"]).group(1)) == scene["image_id"]
            ids.append(scene["image_id"])
    assert len(ids) == len(set(ids)) == 3 * N


def test_coco_ground_truth_loads_in_pycocotools(world):
    from pycocotools.coco import COCO

    gt = COCO(str(world / "annotations" / "coco_karpathy_test_gt.json"))
    test = load(world / "annotations" / "coco_karpathy_test.json")
    ids = [int(Path(e["image"]).stem.split("_")[-1]) for e in test]
    assert sorted(gt.getImgIds()) == sorted(ids)
    first = test[0]
    refs = [a["caption"] for a in gt.imgToAnns[ids[0]]]
    assert refs == first["caption"]
    results = gt.loadRes([{"image_id": i, "caption": "a red circle"} for i in ids])
    assert len(results.getImgIds()) == N


# ------------------------------------------------------------------ content


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_splits_have_unique_descriptions(world, split):
    scenes = load(world / "scenes" / f"scenes_{split}.json")
    descriptions = [s["description"] for s in scenes]
    assert len(set(descriptions)) == len(descriptions) == N
    entries = load(world / "annotations" / f"coco_karpathy_{split}.json")
    first_captions = [blip_caption(e["caption"][0]) for e in entries]
    assert first_captions == descriptions  # caption 0 is the canonical description


def test_captions_describe_every_object_and_relations_are_right(world):
    object_counts = set()
    for split in ("train", "test"):
        for scene in load(world / "scenes" / f"scenes_{split}.json"):
            objects = scene["objects"]
            object_counts.add(len(objects))
            names = [f"{o['size']} {o['colour']} {o['shape']}" for o in objects]
            assert len({o["shape"] for o in objects}) == len({o["colour"] for o in objects}) == len(objects)
            captions = [blip_caption(c) for c in scene["captions"]]
            assert len(set(captions)) == 5
            for caption in captions:
                for name in names:
                    assert name in caption, (caption, names)
            if len(objects) >= 2:
                a, b = objects[0], objects[1]  # left to right: the canonical text relates a to b
                rel = relation(_Obj(a), _Obj(b))
                assert f"{names[0]} {rel} a" in scene["description"] or f"{names[0]} {rel} an" in scene["description"]
                dx, dy = abs(a["x"] - b["x"]), abs(a["y"] - b["y"])
                assert max(dx, dy) >= 1.3 * min(dx, dy) - 1e-6  # never diagonal: the relation is unambiguous
            else:
                assert scene["description"].startswith(f"a {names[0]}") or scene["description"].startswith(
                    f"an {names[0]}"
                )
    assert object_counts == {1, 2, 3}


class _Obj:
    def __init__(self, record):
        self.x, self.y = record["x"], record["y"]


def test_pictures_show_what_the_captions_say(world):
    for split in ("train", "test"):
        for scene in load(world / "scenes" / f"scenes_{split}.json"):
            pixels = np.asarray(Image.open(world / "images" / scene["image"]))
            for obj in scene["objects"]:
                centre = pixels[int(obj["y"]), int(obj["x"])]
                assert nearest_colour(centre) == obj["colour"], (scene["image"], obj)
            corner = pixels[0, 0].astype(int)
            assert corner.min() > 180  # light background


def test_vqa_answers_agree_with_the_scenes(world):
    scenes = {s["image_id"]: s for s in load(world / "scenes" / "scenes_val.json")}
    questions = load(world / "vqa" / "v2_OpenEnded_shapes_val_questions.json")
    annotations = load(world / "vqa" / "v2_shapes_val_annotations.json")
    assert questions["data_subtype"] == annotations["data_subtype"] == "val"
    by_qid = {a["question_id"]: a for a in annotations["annotations"]}
    types, variants = set(), 0
    for q in questions["questions"]:
        ann = by_qid[q["question_id"]]
        objects = scenes[q["image_id"]]["objects"]
        answer, text = ann["multiple_choice_answer"], q["question"]
        types.add(ann["question_type"])
        assert ann["image_id"] == q["image_id"]
        assert [a["answer_id"] for a in ann["answers"]] == list(range(1, 11))
        if m := re.fullmatch(r"what color is the (\w+)\?", text):
            assert answer == next(o["colour"] for o in objects if o["shape"] == m.group(1))
        elif m := re.fullmatch(r"what shape is the (\w+) object\?", text):
            assert answer == next(o["shape"] for o in objects if o["colour"] == m.group(1))
        elif text == "how many shapes are there?":
            assert answer == str(len(objects))
        elif m := re.fullmatch(r"is there an? (\w+) (\w+)\?", text):
            present = any(o["colour"] == m.group(1) and o["shape"] == m.group(2) for o in objects)
            assert answer == ("yes" if present else "no")
        answers = [a["answer"] for a in ann["answers"]]
        if len(set(answers)) > 1:
            variants += 1
        # Every confident annotator gives the answer up to VQA normalisation (case, period, number words, hyphen).
        words = {"zero": "0", "one": "1", "two": "2", "three": "3"}
        for a in ann["answers"]:
            if a["answer_confidence"] == "yes":
                norm = a["answer"].lower().rstrip(".").replace("-", " ")
                assert words.get(norm, norm) == answer
    assert types == {"colour", "shape", "count", "position", "yes/no"}
    assert 0.1 < variants / len(by_qid) < 0.45  # spelling variants are present but not the norm


def test_classification_folders_and_labels(world):
    labels = (world / "classification" / "labels.txt").read_text().splitlines()
    assert labels == sorted(labels) == list(CLASSES) and len(labels) == 60
    assert len(CLASSES) == len(SIZES) * len(COLOURS) * len(SHAPES)
    folders = sorted(p.name for p in (world / "classification" / "train").iterdir())
    assert folders == labels
    counts = [len(list((world / "classification" / "train" / name).glob("*.png"))) for name in labels]
    assert sum(counts) == N and max(counts) - min(counts) <= 1  # balanced
    for name in labels[:10]:
        for png in (world / "classification" / "test" / name).glob("*.png"):
            pixels = np.asarray(Image.open(png)).reshape(-1, 1, 3).astype(int)
            palette = np.array(list(COLOURS.values()))[None]  # (1, 6, 3)
            nearest = ((pixels - palette) ** 2).sum(-1).argmin(-1)
            close = ((pixels - palette) ** 2).sum(-1).min(-1) < 40**2
            colour = list(COLOURS).index(name.split()[1])
            assert ((nearest == colour) & close).sum() > 20


def test_instructions_mix_tasks(world):
    records = [json.loads(line) for line in (world / "instruct" / "instruct_train.jsonl").read_text().splitlines()]
    assert all(set(r) == {"image", "instruction", "response"} for r in records)
    instructions = {r["instruction"] for r in records}
    assert any(i.startswith("describe the ") and i != "describe the image briefly." for i in instructions)
    assert any("caption" in i for i in instructions)
    assert any(i.endswith("?") or "short answer" in i for i in instructions)
    assert len({r["instruction"].split(" ")[0] for r in records}) >= 8  # several phrasings
    describe = [r for r in records if r["instruction"].startswith("describe the ") and "image" not in r["instruction"]]
    assert all(r["response"].startswith("it is a") for r in describe)


def test_shapes_paths(world, tmp_path):
    paths = shapes_paths(world, "val")
    for attr in ("coco_captions", "coco_ground_truth", "flickr", "vqa_questions", "vqa_annotations", "labels"):
        assert getattr(paths, attr).is_file(), attr
    assert paths.image_root.is_dir() and paths.classification_root.is_dir()
    assert shapes_paths(world, "train").coco_ground_truth is None
    with pytest.raises(DataError, match="unknown split"):
        shapes_paths(world, "dev")
    with pytest.raises(DataError, match="not a shapes world"):
        shapes_paths(tmp_path, "val")
