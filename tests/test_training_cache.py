"""Frozen-feature cache: hits and misses, invalidation, exactness, DataLoader workers, toy task end to end."""

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from vlkit.errors import DataError
from vlkit.training.feature_cache import CachedFeatureDataset, FeatureCache, fingerprint_module, transform_signature
from vlkit.training.logging import read_jsonl
from vlkit.training.loop import train
from vlkit.training.recipe import recipe_from_dict


@dataclasses.dataclass(frozen=True)
class Resize:
    size: int = 8
    mean: float = 0.5

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(image[None], size=(self.size, self.size), mode="bilinear")[0] - self.mean


class CountingEncoder(nn.Module):
    """A small conv "ViT" that counts the images it encodes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 4, stride=4)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        return self.conv(x).flatten(2).transpose(1, 2)  # (B, patches, 4)


IMAGES = {f"img/{i:03d}.jpg": torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(10)}


def make_cache(root, encoder, transform):
    return FeatureCache(
        root, encoder_fingerprint=fingerprint_module(encoder), transform_signature=transform_signature(transform)
    )


def fill(cache, encoder, transform, keys, **kw):
    return cache.fill(keys, load=lambda k: transform(IMAGES[k]), encode=encoder, batch_size=3, progress=False, **kw)


def test_miss_then_hit_and_exact_features(tmp_path):
    enc, tf = CountingEncoder(), Resize()
    keys = list(IMAGES)
    cache = make_cache(tmp_path, enc, tf)
    assert cache.missing(keys) == keys
    assert fill(
        cache, enc, tf, keys[:4] + keys[:2], shard_bytes=150
    )  # 64 bytes per image: 3 per shard == 4  # duplicates computed once
    assert enc.seen == 4 and len(list(cache.dir.glob("shard-*.safetensors"))) == 2
    assert fill(cache, enc, tf, keys, shard_bytes=150)  # 64 bytes per image: 3 per shard == 6  # only the misses
    assert enc.seen == 10
    assert fill(cache, enc, tf, keys) == 0 and enc.seen == 10  # all hits
    reopened = make_cache(tmp_path, enc, tf)  # a new process sees the same cache
    assert len(reopened) == 10 and reopened.missing(keys) == []
    with torch.no_grad():
        for key in keys:
            expected = enc(tf(IMAGES[key])[None])[0]
            torch.testing.assert_close(reopened.get(key), expected, rtol=0, atol=0)
    with pytest.raises(DataError, match="no features for 'img/missing.jpg'"):
        reopened.get("img/missing.jpg")


def test_changed_transform_or_encoder_invalidates(tmp_path):
    enc, tf = CountingEncoder(), Resize()
    keys = list(IMAGES)[:3]
    fill(make_cache(tmp_path, enc, tf), enc, tf, keys)
    other_tf = Resize(size=12)
    cache = make_cache(tmp_path, enc, other_tf)
    assert cache.missing(keys) == keys  # another transform: nothing cached
    fill(cache, enc, other_tf, keys)
    assert cache.get(keys[0]).shape == (9, 4)
    with torch.no_grad():
        enc.conv.weight[0, 0, 0, 0] += 1e-3  # fine-tuned encoder: new fingerprint
    assert make_cache(tmp_path, enc, tf).missing(keys) == keys
    assert fingerprint_module(enc) != fingerprint_module(CountingEncoder())
    assert fingerprint_module(enc, "bf16") != fingerprint_module(enc)


def test_autocast_fill_keeps_encoder_dtype(tmp_path):
    enc, tf = CountingEncoder(), Resize()
    cache = FeatureCache(tmp_path, encoder_fingerprint=fingerprint_module(enc, "bf16"), transform_signature="x")
    fill(cache, enc, tf, list(IMAGES)[:2], autocast_dtype=torch.bfloat16)
    assert cache.get(list(IMAGES)[0]).dtype == torch.bfloat16


def test_dataset_wrapper_in_worker_processes(tmp_path):
    enc, tf = CountingEncoder(), Resize()
    cache = make_cache(tmp_path, enc, tf)
    fill(cache, enc, tf, list(IMAGES), shard_bytes=200)
    samples = [{"path": key, "caption": f"caption {i}"} for i, key in enumerate(IMAGES)]
    dataset = CachedFeatureDataset(samples, cache, key_of=lambda s: s["path"], field="image_embeds")
    assert dataset[3]["caption"] == "caption 3"
    torch.testing.assert_close(dataset[3]["image_embeds"], cache.get("img/003.jpg"))
    loader = DataLoader(dataset, batch_size=5, num_workers=2)
    batches = list(loader)
    got = torch.cat([b["image_embeds"] for b in batches])
    torch.testing.assert_close(got, torch.stack([cache.get(k) for k in IMAGES]))


def toy_recipe(task):
    return recipe_from_dict(
        {
            "task": {"name": "toy", "num_samples": 64, "val_samples": 16, "hidden": 16, "freeze_encoder": True, **task},
            "optim": {"lr": 3e-3},
            "run": {"max_steps": 8, "batch_size": 8, "progress": False, "eval_every": "end"},
        }
    )


def test_toy_task_on_cached_features_trains_like_the_encoder(tmp_path):
    train(toy_recipe({}), output_dir=tmp_path / "plain")
    train(toy_recipe({"feature_cache": str(tmp_path / "cache")}), output_dir=tmp_path / "cached")
    plain = [r["loss"] for r in read_jsonl(tmp_path / "plain/metrics.jsonl")]
    cached = [r["loss"] for r in read_jsonl(tmp_path / "cached/metrics.jsonl")]
    torch.testing.assert_close(cached, plain, rtol=1e-6, atol=1e-6)
    assert "64 computed" in (tmp_path / "cached/train.log").read_text()
    train(toy_recipe({"feature_cache": str(tmp_path / "cache")}), output_dir=tmp_path / "again")
    assert "0 computed, 64 cached" in (tmp_path / "again/train.log").read_text()


def test_work_split_does_not_depend_on_what_others_wrote(tmp_path):
    # Under torchrun a rank may look at the cache after another rank wrote its shard; its share must not move.
    enc, tf = CountingEncoder(), Resize()
    keys = list(IMAGES) + list(IMAGES)[:3]  # duplicates
    cache = make_cache(tmp_path, enc, tf)
    before = [cache.share(keys, r, 3) for r in range(3)]
    assert sorted(k for part in before for k in part) == sorted(IMAGES)  # disjoint, complete
    fill(cache, enc, tf, before[0])  # rank 0 finished first
    late = make_cache(tmp_path, enc, tf)
    assert [late.share(keys, r, 3) for r in (1, 2)] == before[1:]
    assert late.share(keys, 0, 3) == []
    with pytest.raises(DataError, match="initialised process group"):
        fill(late, enc, tf, keys, rank=1, world_size=3)
