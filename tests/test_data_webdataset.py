"""WebDataset tar shards: brace patterns, the shard index, random-access reading, bad shards, the
``vlkit data shards`` writer, and stage-1 training on shards equal to training on the caption file."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlkit.cli import main as cli_main
from vlkit.data import generate_shapes_world
from vlkit.data.webdataset import TarCaptionDataset, expand_shards, index_shard, write_shards
from vlkit.errors import DataError, ImageError


def png(colour: str, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def test_expand_shards(tmp_path):
    for i in range(3):
        for j in range(2):
            (tmp_path / f"s{i:03d}-{j}.tar").write_bytes(b"")
    assert [p.name for p in expand_shards("s{000..002}-{0..1}.tar", tmp_path)] == [
        "s000-0.tar", "s000-1.tar", "s001-0.tar", "s001-1.tar", "s002-0.tar", "s002-1.tar",
    ]  # fmt: skip
    assert expand_shards(str(tmp_path / "s001-1.tar")) == [tmp_path / "s001-1.tar"]
    with pytest.raises(DataError, match="runs backwards"):
        expand_shards("s{002..000}-0.tar", tmp_path)
    with pytest.raises(DataError, match=r"1 shard\(s\) missing, e.g. .*s003-0.tar"):
        expand_shards("s{000..003}-0.tar", tmp_path)


def test_index_and_read_back(tmp_path):
    images = {"a": png("red"), "b": png("blue"), "dir/c": png("green")}
    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        add(tar, "a.png", images["a"])
        add(tar, "a.txt", b"  a red square \n")
        add(tar, "b.jpg", images["b"])  # extension as written; the bytes decide the decoding
        add(tar, "b.json", json.dumps({"caption": "a blue square", "url": "x"}).encode())
        add(tar, "dir/c.png", images["dir/c"])  # key = the path up to the first dot of the file name
        add(tar, "dir/c.txt", b"a green square")
        add(tar, "d.txt", b"no image")  # incomplete samples are skipped and counted
        add(tar, "e.png", png("white"))
    samples, skipped = index_shard(tmp_path / "x.tar")
    assert [(s.key, s.caption) for s in samples] == [
        ("a", "a red square"), ("b", "a blue square"), ("dir/c", "a green square"),
    ]  # fmt: skip
    assert skipped == 2
    with pytest.warns(UserWarning, match="skipped 2 sample"):
        data = TarCaptionDataset([tmp_path / "x.tar"], text_processor=str.upper)
    assert len(data) == 3 and data.img_ids == {s.name: i for i, s in enumerate(samples)}
    for sample, key in zip(samples, ("a", "b", "dir/c")):
        assert data.read_bytes(sample.name) == images[key]
    item = data[1]
    assert item["text"] == "A BLUE SQUARE" and item["image_id"] == 1
    assert item["image"].getpixel((0, 0)) == (0, 0, 255)


def test_bad_shards(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(DataError, match="junk.tar: not a readable tar shard"):
        index_shard(tmp_path / "junk.tar")
    with tarfile.open(tmp_path / "empty.tar", "w") as tar:
        add(tar, "a.txt", b"caption without image")
    with pytest.raises(DataError, match="empty.tar: no sample with both an image and a caption"):
        TarCaptionDataset([tmp_path / "empty.tar"])
    with tarfile.open(tmp_path / "badjson.tar", "w") as tar:
        add(tar, "a.png", png("red"))
        add(tar, "a.json", b"{not json")
    with pytest.raises(DataError, match="badjson.tar#a: invalid JSON"):
        index_shard(tmp_path / "badjson.tar")
    with tarfile.open(tmp_path / "corrupt.tar", "w") as tar:
        add(tar, "a.png", b"\x89PNG\r\n\x1a\n broken")
        add(tar, "a.txt", b"broken image")
    data = TarCaptionDataset([tmp_path / "corrupt.tar"])
    with pytest.raises(ImageError, match="corrupt.tar#a.png"):
        data.load(data.annotation[0]["image"])
    skipping = TarCaptionDataset([tmp_path / "corrupt.tar"], skip_bad_images=True)
    with pytest.warns(UserWarning, match="skipping bad image"):
        assert skipping.load(skipping.annotation[0]["image"]) is None
    with pytest.raises(DataError, match="not a sample of these shards"):
        data.read_bytes("elsewhere.tar#a.png")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wds") / "shapes"
    generate_shapes_world(root, images=6, size=32, seed=5)
    return root


def test_vlkit_data_shards_round_trip(world, tmp_path, capsys):
    ann = world / "annotations" / "coco_karpathy_train.json"
    assert (
        cli_main(["data", "shards", str(ann), str(world / "images"), str(tmp_path / "s-{}.tar"), "--per-shard", "7"])
        == 0
    )
    assert "wrote 5 shard(s)" in capsys.readouterr().out  # 6 images x 5 captions = 30 pairs, 7 per shard
    shards = expand_shards(str(tmp_path / "s-{000000..000004}.tar"))
    data = TarCaptionDataset(shards)
    entries = json.loads(ann.read_text())
    assert [a["caption"] for a in data.annotation] == [e["caption"] for e in entries]
    for got, entry in zip(data.annotation, entries):
        assert data.read_bytes(got["image"]) == (world / "images" / entry["image"]).read_bytes()
    assert not list(tmp_path.glob(".*tmp"))  # written atomically
    with pytest.raises(DataError, match="one {}"):
        write_shards([(b"x", "png", "c")], tmp_path / "no-pattern.tar")


def test_stage1_trains_on_shards_exactly_as_on_the_caption_file(world, tmp_path):
    """Same pairs in the same order: the same losses step for step (pretraining ITC has no image-id
    positives, so the per-caption image ids of shards do not matter)."""
    from test_task_stage1 import recipe as stage1_recipe

    from vlkit.data.tokenizers import qformer_corpus, shapes_texts, train_wordpiece
    from vlkit.training.logging import read_jsonl
    from vlkit.training.loop import train

    train_wordpiece(qformer_corpus(shapes_texts(world)), world / "tokenizers" / "qformer")
    write_shards(
        __import__("vlkit.data.webdataset", fromlist=["x"]).caption_file_pairs(
            [world / "annotations" / "coco_karpathy_train.json"], world / "images"
        ),
        world / "shards" / "train-{}.tar",
        per_shard=8,
    )
    run = {"max_steps": 3, "batch_size": 6, "shuffle": False, "log_every": 1}
    files = train(stage1_recipe(world, run=run), output_dir=tmp_path / "files")
    shards = train(
        stage1_recipe(
            world,
            run=run,
            train=[{"shards": ["shards/train-{000000..000003}.tar"], "transform": "blip_image_eval"}],
        ),
        output_dir=tmp_path / "shards",
    )
    a, b = read_jsonl(files.run_dir / "metrics.jsonl"), read_jsonl(shards.run_dir / "metrics.jsonl")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key in ("loss_itc", "loss_itm", "loss_itg"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), key
    assert torch.isfinite(torch.tensor(b[-1]["loss"]))
