"""Collectives with and without a process group, and a real 2-process gloo run of the stage-1 losses."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlkit import distributed, losses
from vlkit.errors import ConfigError

WORLD, B, Q, DIN, E, N, T = 2, 3, 4, 5, 6, 3, 7
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------------------------------------------
# Single process: every helper keeps its one-process meaning without a process group.


def test_helpers_without_process_group(monkeypatch):
    for var in _TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    assert not distributed.is_distributed()
    assert distributed.rank() == 0 and distributed.world_size() == 1
    x = torch.randn(3, 4, requires_grad=True)
    gathered = distributed.all_gather_no_grad(x)
    assert torch.equal(gathered, x) and not gathered.requires_grad
    assert distributed.all_gather_with_grad(x) is x
    summed = distributed.all_reduce_sum(x)
    assert torch.equal(summed, x) and summed.data_ptr() != x.data_ptr()
    distributed.barrier()
    info = distributed.init_from_env()
    assert (info.rank, info.world_size, info.local_rank, info.initialised) == (0, 1, 0, False)
    assert not distributed.is_distributed()
    distributed.shutdown()


def test_init_from_env_rejects_bad_variables(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "zero")
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        distributed.init_from_env()


def test_stage1_losses_run_without_process_group():
    """LAVIS needs dist.get_rank() here; vlkit runs the whole ITC -> ITM chain as a plain process."""
    image_embeds = torch.randn(B, N, E, requires_grad=True)
    image_feats = F.normalize(image_embeds[:, :Q].mean(1, keepdim=True).expand(B, Q, E) + torch.randn(B, Q, E), dim=-1)
    text_feat = F.normalize(torch.randn(B, E), dim=-1)
    itc = losses.itc_loss(image_feats, text_feat, 0.07)
    neg = losses.sample_itm_negatives(itc.sim_i2t, itc.sim_t2i, itc.positive_mask)
    batch = losses.build_itm_batch(image_embeds, torch.randint(0, 9, (B, T)), torch.ones(B, T), neg)
    assert batch.image_embeds.shape == (3 * B, N, E) and batch.labels.shape == (3 * B,)
    assert (neg.image_index != torch.arange(B)).all() and (neg.text_index != torch.arange(B)).all()


# ----------------------------------------------------------------------------------------------------------------
# Two processes (gloo on CPU).


def _global_data() -> dict[str, torch.Tensor]:
    """Identical on every rank: parameters and the global batch of W·B samples."""
    g = torch.Generator().manual_seed(1234)
    return {
        "w_img": torch.randn(DIN, E, generator=g),
        "w_txt": torch.randn(DIN, E, generator=g),
        "w_emb": torch.randn(DIN, E, generator=g),
        "head": torch.randn(E, 2, generator=g),
        "tok": torch.randn(50, 2, generator=g),
        "x_img": torch.randn(WORLD * B, Q, DIN, generator=g),
        "x_txt": torch.randn(WORLD * B, DIN, generator=g),
        "x_emb": torch.randn(WORLD * B, N, DIN, generator=g),
        "ids": torch.randint(0, 50, (WORLD * B, T), generator=g),
        "mask": (torch.arange(T) < torch.randint(2, T + 1, (WORLD * B, 1), generator=g)).long(),
        # Shared image ids, some shared across the two ranks.
        "image_ids": torch.tensor([4, 1, 4, 1, 9, 4]),
        "scale": torch.randn(WORLD * B, Q, E, generator=g),
    }


def _params(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    params = {k: data[k].clone().requires_grad_(True) for k in ("w_img", "w_txt", "w_emb", "head", "tok")}
    params["temp"] = torch.tensor(0.07, requires_grad=True)
    return params


def _features(p: dict[str, torch.Tensor], data: dict[str, torch.Tensor], rows: slice):
    image_feats = F.normalize(data["x_img"][rows] @ p["w_img"], dim=-1)  # (b, Q, E)
    text_feat = F.normalize(data["x_txt"][rows] @ p["w_txt"], dim=-1)  # (b, E)
    image_embeds = data["x_emb"][rows] @ p["w_emb"]  # (b, N, E)
    return image_feats, text_feat, image_embeds


def _itm_logits(p: dict[str, torch.Tensor], batch: losses.ItmBatch) -> torch.Tensor:
    """A stand-in ITM head touching both the image embeddings and the text ids."""
    text = (p["tok"][batch.text_ids] * batch.text_mask[..., None]).sum(1)  # (3b, 2)
    return batch.image_embeds.mean(1) @ p["head"] + text


def _grads(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.grad.clone() for k, v in p.items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(WORLD)}
    )
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    info = distributed.init_from_env("gloo", timeout=timedelta(seconds=60))
    try:
        assert (info.rank, info.world_size, info.initialised) == (rank, WORLD, True)
        assert distributed.is_distributed() and distributed.rank() == rank and distributed.world_size() == WORLD
        data = _global_data()
        local = slice(rank * B, (rank + 1) * B)
        result: dict[str, object] = {}

        x = data["x_img"][local].clone().requires_grad_(True)
        gathered = distributed.all_gather_no_grad(x)
        result["gather_no_grad"] = gathered
        result["gather_no_grad_requires_grad"] = gathered.requires_grad
        y = distributed.all_gather_with_grad(x * 2)
        (y * data["scale"][..., :DIN]).sum().backward()
        result["gather_with_grad"] = y.detach()
        result["gather_with_grad_grad"] = x.grad
        result["reduce"] = distributed.all_reduce_sum(torch.tensor([rank + 1.0, 10.0]))
        distributed.barrier()

        for with_ids in (False, True):
            p = _params(data)
            image_feats, text_feat, image_embeds = _features(p, data, local)
            ids = data["image_ids"][local] if with_ids else None
            itc = losses.itc_loss(image_feats, text_feat, p["temp"], image_ids=ids)
            gen = torch.Generator().manual_seed(100 + rank)
            neg = losses.sample_itm_negatives(itc.sim_i2t, itc.sim_t2i, itc.positive_mask, generator=gen)
            batch = losses.build_itm_batch(image_embeds, data["ids"][local], data["mask"][local], neg)
            loss_itm = losses.itm_loss(_itm_logits(p, batch), batch.labels)
            (itc.loss + loss_itm).backward()
            result[f"ids={with_ids}"] = {
                "loss_itc": itc.loss.detach(),
                "loss_itm": loss_itm.detach(),
                "sim_i2t": itc.sim_i2t.detach(),
                "positive_mask": itc.positive_mask,
                "rank": itc.rank,
                "neg_image": neg.image_index,
                "neg_text": neg.text_index,
                "grads": _grads(p),
            }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()
    assert not distributed.is_distributed()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_gathers_and_reduce_across_two_processes(two_rank_results):
    data = _global_data()
    for rank, res in enumerate(two_rank_results):
        torch.testing.assert_close(res["gather_no_grad"], data["x_img"])
        assert res["gather_no_grad_requires_grad"] is False
        torch.testing.assert_close(res["gather_with_grad"], 2 * data["x_img"])
        # y = gather(2x) and loss_r = Σ y·scale on *every* rank: the gradient of rank r's rows is the sum of
        # the two ranks' gradients, 2·(scale + scale) = 4·scale on its own slice.
        local = slice(rank * B, (rank + 1) * B)
        torch.testing.assert_close(res["gather_with_grad_grad"], 4 * data["scale"][local, :, :DIN])
        torch.testing.assert_close(res["reduce"], torch.tensor([3.0, 20.0]))


def _replay_gather(globals_: list[torch.Tensor], local: slice):
    """Stand-in for the no-grad gather of one rank: the global tensor whose local rows are the argument."""

    def gather(t: torch.Tensor) -> torch.Tensor:
        (match,) = [g for g in globals_ if torch.equal(g[local], t)]
        return match

    return gather


@pytest.mark.parametrize("with_ids", [False, True])
def test_two_process_losses_match_single_process(two_rank_results, with_ids):
    data = _global_data()
    ranks = [res[f"ids={with_ids}"] for res in two_rank_results]

    # ITC: one process over the whole global batch (W = 1, 2B rows) is the DDP average of the two ranks.
    p = _params(data)
    image_feats, text_feat, _ = _features(p, data, slice(None))
    ids = data["image_ids"] if with_ids else None
    itc = losses.itc_loss(image_feats, text_feat, p["temp"], image_ids=ids)
    for rank, r in enumerate(ranks):
        assert r["rank"] == rank
        torch.testing.assert_close(r["sim_i2t"], itc.sim_i2t[rank * B : (rank + 1) * B].detach())
        torch.testing.assert_close(r["positive_mask"], itc.positive_mask[rank * B : (rank + 1) * B])
        assert not r["positive_mask"].gather(1, r["neg_image"][:, None]).any()
        assert not r["positive_mask"].gather(1, r["neg_text"][:, None]).any()
    torch.testing.assert_close((ranks[0]["loss_itc"] + ranks[1]["loss_itc"]) / 2, itc.loss.detach())
    itc.loss.backward()
    itc_grads = {k: v.grad.clone() for k, v in p.items() if v.grad is not None}

    # ITM: replay both ranks in one process with the negatives they drew; the image embeddings of the
    # negatives come from the global tensor with its graph (what all_gather_with_grad provides).
    p2 = _params(data)
    _, _, embeds_all = _features(p2, data, slice(None))
    itm_total = 0.0
    for rank, r in enumerate(ranks):
        local = slice(rank * B, (rank + 1) * B)
        neg = losses.ItmNegatives(r["neg_image"], r["neg_text"], torch.ones(B, dtype=torch.bool))
        batch = losses.build_itm_batch(
            embeds_all[local],
            data["ids"][local],
            data["mask"][local],
            neg,
            gather_with_grad=lambda t: embeds_all,
            gather=_replay_gather([data["ids"], data["mask"]], local),
        )
        loss = losses.itm_loss(_itm_logits(p2, batch), batch.labels)
        torch.testing.assert_close(loss.detach(), r["loss_itm"])
        itm_total = itm_total + loss
    itm_total.backward()

    # Each rank backpropagated loss_itc_r + loss_itm_r. Summed over ranks: the ITC part is 2× the global
    # single-process gradient, the ITM part the gradient of the summed replay.
    for name in ("w_img", "w_txt", "w_emb", "head", "tok", "temp"):
        summed = ranks[0]["grads"][name] + ranks[1]["grads"][name]
        expected = torch.zeros_like(summed)
        if name in itc_grads:
            expected = expected + WORLD * itc_grads[name]
        if p2[name].grad is not None:
            expected = expected + p2[name].grad
        torch.testing.assert_close(summed, expected, atol=1e-5, rtol=1e-5)
    assert ranks[0]["grads"]["w_emb"].abs().sum() > 0
