import math

import pytest
import torch
import torch.nn.functional as F

from vlkit import losses
from vlkit.errors import VlkitError
from vlkit.losses import IGNORE_INDEX, ItmNegatives, LossInputError


def _normed(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


def _soft_ce_loop(row: list[float], positives: list[bool], eps: float) -> float:
    """-Σ_j target_j · log_softmax(row)_j with target = (1-ε)·pos/Σpos + ε/K, written out."""
    k = len(row)
    m = max(row)
    log_z = m + math.log(sum(math.exp(v - m) for v in row))
    n_pos = sum(positives)
    return -sum(((1 - eps) * p / n_pos + eps / k) * (v - log_z) for v, p in zip(row, positives))


# ----------------------------------------------------------------------------------------------------------------
# itc_similarity


def test_itc_similarity_by_hand():
    image = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]])  # (2, 2, 2)
    text = torch.tensor([[0.0, 2.0], [3.0, 1.0], [-1.0, -1.0]])  # (3, 2)
    # Row i, column t: max over the two queries of the dot product.
    expected = torch.tensor([[2.0, 3.0, -1.0], [1.6, 2.6, 1.0]])
    for impl in ("chunked", "reference"):
        torch.testing.assert_close(losses.itc_similarity(image, text, impl=impl), expected)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 100])
def test_itc_similarity_chunked_matches_reference_values_and_grads(chunk_size):
    image = torch.randn(7, 5, 6, requires_grad=True)
    text = torch.randn(9, 6, requires_grad=True)
    weight = torch.randn(7, 9)
    fast = losses.itc_similarity(image, text, chunk_size=chunk_size)
    (g_img_fast, g_txt_fast) = torch.autograd.grad((fast * weight).sum(), (image, text))
    ref = losses.itc_similarity(image, text, impl="reference")
    (g_img_ref, g_txt_ref) = torch.autograd.grad((ref * weight).sum(), (image, text))
    torch.testing.assert_close(fast, ref)
    torch.testing.assert_close(g_img_fast, g_img_ref)
    torch.testing.assert_close(g_txt_fast, g_txt_ref)
    # The maximum sends gradient to one query per (image, text) pair only.
    assert int((g_img_ref.abs().sum(-1) > 0).sum()) <= 7 * 9


def test_itc_similarity_auto_chunks_large_inputs(monkeypatch):
    monkeypatch.setattr(losses, "_SIM_CHUNK_ELEMENTS", 64)  # forces chunks of 1 image (Q·Nt = 40 elements)
    image, text = torch.randn(5, 4, 3), torch.randn(10, 3)
    torch.testing.assert_close(losses.itc_similarity(image, text), losses.itc_similarity(image, text, impl="reference"))


def test_itc_similarity_rejects_bad_shapes():
    with pytest.raises(LossInputError, match="embedding sizes differ"):
        losses.itc_similarity(torch.randn(2, 3, 4), torch.randn(5, 6))
    with pytest.raises(LossInputError, match="image_feats must be"):
        losses.itc_similarity(torch.randn(2, 4), torch.randn(5, 4))
    with pytest.raises(LossInputError, match="impl"):
        losses.itc_similarity(torch.randn(2, 3, 4), torch.randn(5, 4), impl="fast")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# ITC


@pytest.mark.parametrize("eps", [0.1, 0.0, 0.3])
def test_itc_loss_by_hand_single_process(eps):
    b, q, e, temp = 3, 2, 4, 0.07
    image, text = _normed(b, q, e), _normed(b, e)
    out = losses.itc_loss(image, text, temp, label_smoothing=eps)

    sim_i2t = [[max(_dot(image[i, k], text[j]) for k in range(q)) / temp for j in range(b)] for i in range(b)]
    sim_t2i = [[max(_dot(text[i], image[j, k]) for k in range(q)) / temp for j in range(b)] for i in range(b)]
    torch.testing.assert_close(out.sim_i2t, torch.tensor(sim_i2t, dtype=torch.float64))
    torch.testing.assert_close(out.sim_t2i, torch.tensor(sim_t2i, dtype=torch.float64))
    diag = [[i == j for j in range(b)] for i in range(b)]
    loss_i2t = sum(_soft_ce_loop(sim_i2t[i], diag[i], eps) for i in range(b)) / b
    loss_t2i = sum(_soft_ce_loop(sim_t2i[i], diag[i], eps) for i in range(b)) / b
    assert out.loss_i2t.item() == pytest.approx(loss_i2t, rel=1e-6)
    assert out.loss_t2i.item() == pytest.approx(loss_t2i, rel=1e-6)
    assert out.loss.item() == pytest.approx((loss_i2t + loss_t2i) / 2, rel=1e-6)
    assert out.rank == 0
    assert torch.equal(out.positive_mask, torch.eye(b, dtype=torch.bool))


@pytest.mark.parametrize("eps", [0.1, 0.0, 0.25])
def test_itc_single_positive_equals_cross_entropy_label_smoothing(eps):
    image, text = _normed(5, 3, 8).float(), _normed(5, 8).float()
    temp = torch.tensor(0.05)
    out = losses.itc_loss(image, text, temp, label_smoothing=eps)
    target = torch.arange(5)
    torch.testing.assert_close(out.loss_i2t, F.cross_entropy(out.sim_i2t, target, label_smoothing=eps))
    torch.testing.assert_close(out.loss_t2i, F.cross_entropy(out.sim_t2i, target, label_smoothing=eps))


def test_itc_multi_positive_targets_by_hand():
    b, q, e, temp, eps = 4, 3, 5, 0.1, 0.1
    image, text = _normed(b, q, e), _normed(b, e)
    ids = torch.tensor([7, 3, 7, 7])  # samples 0, 2, 3 show the same image
    out = losses.itc_loss(image, text, temp, image_ids=ids)
    pos = [[int(ids[i]) == int(ids[j]) for j in range(b)] for i in range(b)]
    assert out.positive_mask.tolist() == pos
    loss_i2t = sum(_soft_ce_loop(out.sim_i2t[i].tolist(), pos[i], eps) for i in range(b)) / b
    loss_t2i = sum(_soft_ce_loop(out.sim_t2i[i].tolist(), pos[i], eps) for i in range(b)) / b
    assert out.loss.item() == pytest.approx((loss_i2t + loss_t2i) / 2, rel=1e-6)
    # Row 0 spreads 0.9 over its three positives: 0.3 + 0.1/4 each, 0.025 on the negative.
    logp = F.log_softmax(out.sim_i2t[0], dim=0)
    row0 = -(0.325 * (logp[0] + logp[2] + logp[3]) + 0.025 * logp[1])
    assert row0.item() == pytest.approx(_soft_ce_loop(out.sim_i2t[0].tolist(), pos[0], eps), rel=1e-9)
    # Unique ids reduce to the default single-positive loss.
    unique = losses.itc_loss(image, text, temp, image_ids=torch.tensor([4, 1, 0, 9]))
    torch.testing.assert_close(unique.loss, losses.itc_loss(image, text, temp).loss)


def test_itc_temperature_is_learnable_and_unclamped():
    image, text = _normed(3, 2, 4).float(), _normed(3, 4).float()
    temp = torch.tensor(0.001, requires_grad=True)  # far below any clamp a BLIP-1 style loss would apply
    out = losses.itc_loss(image, text, temp)
    torch.testing.assert_close(out.sim_i2t * 0.001, losses.itc_similarity(image, text))
    out.loss.backward()
    assert temp.grad is not None and temp.grad.item() != 0.0


def _fake_two_rank_gather(rank: int, globals_: list[torch.Tensor], batch: int):
    """A gather that returns the global tensor whose local slice has the shape of the argument."""

    def gather(t: torch.Tensor) -> torch.Tensor:
        for g in globals_:
            if g.shape[1:] == t.shape[1:] and g.dtype == t.dtype:
                parts = list(g.split(batch))
                parts[rank] = t
                return torch.cat(parts)
        raise AssertionError(f"no global tensor for {tuple(t.shape)}")

    return gather


@pytest.mark.parametrize("rank", [0, 1])
def test_itc_gradient_flows_only_through_local_rows(rank):
    b, q, e, temp = 3, 4, 6, 0.07
    image_all = _normed(2 * b, q, e).requires_grad_(True)
    text_all = _normed(2 * b, e).requires_grad_(True)
    local = slice(rank * b, (rank + 1) * b)
    # The fake gather returns the global tensors *with* their graph; itc_loss must cut it.
    gather = _fake_two_rank_gather(rank, [image_all, text_all], b)
    out = losses.itc_loss(image_all[local], text_all[local], temp, rank=rank, gather=gather)
    assert out.sim_i2t.shape == out.sim_t2i.shape == (b, 2 * b)
    assert out.positive_mask.nonzero().tolist() == [[i, rank * b + i] for i in range(b)]
    out.loss.backward()

    other = slice((1 - rank) * b, (2 - rank) * b)
    assert torch.all(image_all.grad[other] == 0) and torch.all(text_all.grad[other] == 0)
    assert torch.all(text_all.grad[local].abs().sum(-1) > 0)
    # Image gradient only at the arg-max query of some (image, text) pair of the local rows.
    sims = torch.einsum("iqe,te->itq", image_all[local].detach(), text_all.detach())  # (b, 2b, q)
    used = torch.zeros(b, q, dtype=torch.bool)
    for i in range(b):
        for j in range(2 * b):
            used[i, sims[i, j].argmax()] = True
    assert torch.equal(image_all.grad[local].abs().sum(-1) > 0, used)

    # Same loss and gradient as an explicit "local rows, constant global columns" computation.
    image_loc = image_all[local].detach().requires_grad_(True)
    text_loc = text_all[local].detach().requires_grad_(True)
    sim_i2t = torch.einsum("iqe,te->itq", image_loc, text_all.detach()).max(-1).values / temp
    sim_t2i = torch.einsum("te,iqe->tiq", text_loc, image_all.detach()).max(-1).values / temp
    target = torch.arange(b) + rank * b
    ref = (
        F.cross_entropy(sim_i2t, target, label_smoothing=0.1) + F.cross_entropy(sim_t2i, target, label_smoothing=0.1)
    ) / 2
    ref.backward()
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(image_all.grad[local], image_loc.grad)
    torch.testing.assert_close(text_all.grad[local], text_loc.grad)


def test_itc_single_process_columns_are_constants():
    """On one process the columns are detached too: the gradient is the "local rows" one, not the full one."""
    image = _normed(4, 2, 5).requires_grad_(True)
    text = _normed(4, 5).requires_grad_(True)
    losses.itc_loss(image, text, 0.1).loss.backward()
    image_ref = image.detach().clone().requires_grad_(True)
    text_ref = text.detach().clone().requires_grad_(True)
    sim_i2t = losses.itc_similarity(image_ref, text_ref.detach()) / 0.1
    sim_t2i = losses.itc_similarity(image_ref.detach(), text_ref).t() / 0.1
    target = torch.arange(4)
    (
        (F.cross_entropy(sim_i2t, target, label_smoothing=0.1) + F.cross_entropy(sim_t2i, target, label_smoothing=0.1))
        / 2
    ).backward()
    torch.testing.assert_close(image.grad, image_ref.grad)
    torch.testing.assert_close(text.grad, text_ref.grad)


def test_itc_multi_positive_across_ranks():
    b = 2
    image_all, text_all = _normed(2 * b, 3, 4), _normed(2 * b, 4)
    ids_all = torch.tensor([5, 8, 8, 1])
    gather = _fake_two_rank_gather(1, [image_all, text_all, ids_all], b)
    out = losses.itc_loss(image_all[b:], text_all[b:], 0.1, image_ids=ids_all[b:], rank=1, gather=gather)
    assert out.positive_mask.tolist() == [[False, True, True, False], [False, False, False, True]]


def test_itc_bf16_inputs_give_fp32_loss_close_to_fp32():
    image, text = _normed(6, 4, 16).float(), _normed(6, 16).float()
    ref = losses.itc_loss(image, text, 0.07).loss
    low = losses.itc_loss(image.bfloat16(), text.bfloat16(), 0.07).loss
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=0.05, rtol=0)


def test_itc_under_cpu_autocast():
    image, text = _normed(6, 4, 16).float(), _normed(6, 16).float()
    temp = torch.tensor(0.07, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = losses.itc_loss(image, text, temp)
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert temp.grad is not None
    torch.testing.assert_close(out.loss, losses.itc_loss(image, text, 0.07).loss, atol=0.05, rtol=0)


def test_itc_errors():
    with pytest.raises(LossInputError, match="batch sizes differ"):
        losses.itc_loss(torch.randn(2, 3, 4), torch.randn(3, 4), 0.1)
    with pytest.raises(LossInputError, match="rank is required"):
        losses.itc_loss(torch.randn(2, 3, 4), torch.randn(2, 4), 0.1, gather=lambda t: t)
    with pytest.raises(LossInputError, match="integers"):
        losses.itc_loss(torch.randn(2, 3, 4), torch.randn(2, 4), 0.1, image_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(VlkitError, match="image_ids has 3 entries"):
        losses.itc_loss(torch.randn(2, 3, 4), torch.randn(2, 4), 0.1, image_ids=torch.tensor([0, 1, 2]))


# ----------------------------------------------------------------------------------------------------------------
# ITM


def test_itm_negatives_never_positive_over_many_draws():
    b, total, rank = 4, 8, 1
    gen = torch.Generator().manual_seed(0)
    # Positives get by far the largest similarity: only the masking keeps them out.
    sim = torch.randn(b, total)
    diag = losses.itc_positive_mask(b, total, rank)
    ids_all = torch.tensor([0, 1, 2, 3, 0, 0, 5, 3])
    by_id = losses.itc_positive_mask(b, total, rank, image_ids=ids_all[4:], image_ids_all=ids_all)
    for mask in (diag, by_id):
        boosted = sim + 50.0 * mask
        for _ in range(300):
            neg = losses.sample_itm_negatives(boosted, boosted.flip(1), mask, generator=gen)
            assert not mask.gather(1, neg.image_index[:, None]).any()
            assert not mask.gather(1, neg.text_index[:, None]).any()
            assert neg.has_negative.all()


def test_itm_negatives_follow_the_softmax_of_negatives():
    sim_t2i = torch.tensor([[0.0, 1.0, 2.0, 5.0]])  # column 3 is the positive
    mask = torch.tensor([[False, False, False, True]])
    gen = torch.Generator().manual_seed(1)
    n = 20000
    draws = torch.stack(
        [losses.sample_itm_negatives(sim_t2i, sim_t2i, mask, generator=gen).image_index for _ in range(n // 100)]
    )
    # Batched draws: replicate the row instead of looping.
    rows = sim_t2i.expand(n, 4)
    neg = losses.sample_itm_negatives(rows, rows, mask.expand(n, 4), generator=gen)
    freq = torch.bincount(neg.image_index, minlength=4).double() / n
    expected = torch.tensor([1.0, math.e, math.e**2, 0.0], dtype=torch.float64)
    expected /= expected.sum()
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)
    assert (draws != 3).all()


def test_itm_negatives_reproducible_and_degenerate_rows_flagged():
    sim = torch.randn(3, 3)
    mask = torch.tensor([[True, True, True], [False, True, False], [False, False, True]])
    a = losses.sample_itm_negatives(sim, sim.t(), mask, generator=torch.Generator().manual_seed(5))
    b = losses.sample_itm_negatives(sim, sim.t(), mask, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.image_index, b.image_index) and torch.equal(a.text_index, b.text_index)
    assert a.has_negative.tolist() == [False, True, True]


def test_itm_negatives_reject_bad_mask():
    with pytest.raises(LossInputError, match="bool"):
        losses.sample_itm_negatives(torch.randn(2, 2), torch.randn(2, 2), torch.eye(2))
    with pytest.raises(LossInputError, match="share one"):
        losses.sample_itm_negatives(torch.randn(2, 2), torch.randn(2, 3), torch.eye(2, dtype=torch.bool))


def test_build_itm_batch_single_process():
    b, n, d, t = 3, 5, 4, 6
    embeds = torch.randn(b, n, d, requires_grad=True)
    ids = torch.randint(1, 100, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 4:] = 0
    neg = ItmNegatives(torch.tensor([2, 0, 0]), torch.tensor([1, 2, 1]), torch.ones(b, dtype=torch.bool))
    batch = losses.build_itm_batch(embeds, ids, mask, neg)
    assert batch.labels.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    torch.testing.assert_close(batch.image_embeds, torch.cat([embeds, embeds[[2, 0, 0]], embeds]))
    assert torch.equal(batch.text_ids, torch.cat([ids, ids, ids[[1, 2, 1]]]))
    assert torch.equal(batch.text_mask, torch.cat([mask, mask, mask[[1, 2, 1]]]))
    # Negative images keep their gradient path: image 0 appears twice among negatives, image 1 never.
    batch.image_embeds.sum().backward()
    torch.testing.assert_close(embeds.grad[:, 0, 0], torch.tensor([4.0, 2.0, 3.0]))


def test_build_itm_batch_takes_negatives_from_other_ranks():
    b = 2
    embeds_all = torch.randn(2 * b, 3, 4, requires_grad=True)
    ids_all = torch.arange(2 * b * 5).view(2 * b, 5)
    mask_all = torch.ones(2 * b, 5, dtype=torch.long)
    rank = 0
    gather = _fake_two_rank_gather(rank, [ids_all], b)
    neg = ItmNegatives(torch.tensor([3, 2]), torch.tensor([2, 3]), torch.ones(b, dtype=torch.bool))
    batch = losses.build_itm_batch(
        embeds_all[:b], ids_all[:b], mask_all[:b], neg, gather_with_grad=lambda t: embeds_all, gather=gather
    )
    assert torch.equal(batch.text_ids[2 * b :], ids_all[[2, 3]])
    batch.image_embeds[b : 2 * b].sum().backward()
    assert torch.all(embeds_all.grad[:b] == 0) and torch.all(embeds_all.grad[b:] == 1)


def test_add_itm_text_negatives_appends_non_matches_with_their_owner_image():
    b, n, d, t = 3, 5, 4, 6
    embeds = torch.randn(b, n, d, requires_grad=True)
    ids, mask = torch.randint(1, 100, (b, t)), torch.ones(b, t, dtype=torch.long)
    neg = ItmNegatives(torch.tensor([2, 0, 0]), torch.tensor([1, 2, 1]), torch.ones(b, dtype=torch.bool))
    base = losses.build_itm_batch(embeds, ids, mask, neg)
    owner = torch.tensor([2, 0])
    swapped_ids, swapped_mask = torch.randint(1, 100, (2, t)), torch.ones(2, t, dtype=torch.long)
    swapped_mask[0, 5:] = 0
    batch = losses.add_itm_text_negatives(base, embeds, owner, swapped_ids, swapped_mask)
    assert batch.labels.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    torch.testing.assert_close(batch.image_embeds[3 * b :], embeds[[2, 0]])
    assert torch.equal(batch.text_ids[3 * b :], swapped_ids) and torch.equal(batch.text_mask[3 * b :], swapped_mask)
    assert torch.equal(batch.text_ids[: 3 * b], base.text_ids)
    batch.image_embeds[3 * b :].sum().backward()  # the owners' images get the gradient of their new pairs
    torch.testing.assert_close(embeds.grad[:, 0, 0], torch.tensor([1.0, 0.0, 1.0]))
    empty = losses.add_itm_text_negatives(base, embeds, owner[:0], swapped_ids[:0], swapped_mask[:0])
    assert empty.labels.shape == (3 * b,)
    with pytest.raises(LossInputError, match="owner indices"):
        losses.add_itm_text_negatives(base, embeds, torch.tensor([3, 0]), swapped_ids, swapped_mask)
    with pytest.raises(LossInputError, match=r"\(M, 6\)"):
        losses.add_itm_text_negatives(base, embeds, owner, swapped_ids[:, :4], swapped_mask[:, :4])


def test_itm_loss_by_hand():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0], [0.5, 0.5]])
    labels = torch.tensor([1, 0, 0])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-2.0)) + math.log(2.0)) / 3
    assert losses.itm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert losses.itm_loss(logits.bfloat16(), labels).dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------
# ITG and language-model losses


def test_itg_inputs_replace_cls_and_mask_pad():
    ids = torch.tensor([[101, 7, 8, 102, 0, 0], [101, 9, 102, 0, 0, 0]])
    dec, labels = losses.itg_inputs(ids, dec_token_id=30522, pad_id=0)
    assert dec.tolist() == [[30522, 7, 8, 102, 0, 0], [30522, 9, 102, 0, 0, 0]]
    assert labels.tolist() == [[30522, 7, 8, 102, -100, -100], [30522, 9, 102, -100, -100, -100]]
    assert ids[0, 0] == 101  # input untouched


def _shifted_ce_loop(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> float:
    """Mean over targets of (1-ε)·(-log p_y) + ε·mean_v(-log p_v), position t predicting labels[t+1]."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == IGNORE_INDEX:
                continue
            row = [float(v) for v in logits[b, t]]
            m = max(row)
            log_z = m + math.log(sum(math.exp(v - m) for v in row))
            nll = log_z - row[y]
            smooth = sum(log_z - v for v in row) / len(row)
            total += (1 - eps) * nll + eps * smooth
            count += 1
    return total / count


def test_itg_loss_by_hand_with_label_smoothing():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[30, 1, 2, 3, -100], [30, 6, -100, -100, -100]])
    expected = _shifted_ce_loop(logits, labels, 0.1)
    assert losses.itg_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), label_smoothing=0.1)
    assert losses.itg_loss(logits, labels).item() == pytest.approx(ref.item(), rel=1e-6)
    # Position 0's label ([DEC]) is never a target: changing it changes nothing.
    labels2 = labels.clone()
    labels2[:, 0] = 3
    assert losses.itg_loss(logits, labels2).item() == pytest.approx(expected, rel=1e-6)


def test_causal_lm_targets_prompt_and_bos():
    # OPT: BOS 2, pad 1, "\n" 50118.
    ids = torch.tensor([[2, 10, 11, 12, 50118, 1], [2, 20, 50118, 1, 1, 1]])
    no_prompt = losses.causal_lm_targets(ids, num_query_tokens=3, pad_id=1)
    assert no_prompt.tolist() == [
        [-100, -100, -100, 2, 10, 11, 12, 50118, -100],
        [-100, -100, -100, 2, 20, 50118, -100, -100, -100],
    ]
    prompt = losses.causal_lm_targets(ids, num_query_tokens=2, pad_id=1, prompt_len=2)
    assert prompt.tolist() == [
        [-100, -100, -100, -100, 11, 12, 50118, -100],
        [-100, -100, -100, -100, 50118, -100, -100, -100],
    ]
    assert ids[0, 0] == 2  # input untouched


def test_causal_lm_loss_by_hand():
    logits = torch.randn(2, 6, 5, dtype=torch.float64)
    targets = torch.tensor([[-100, -100, 2, 3, 4, -100], [-100, -100, 1, -100, -100, -100]])
    expected = _shifted_ce_loop(logits, targets, 0.0)
    assert losses.causal_lm_loss(logits, targets).item() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(LossInputError, match="labels"):
        losses.causal_lm_loss(logits, targets[:, :4])


def _pack_loop(instr_ids, instr_mask, resp_ids, resp_mask, pad_id, q):
    """Row-by-row packing written literally from the spec (§2.5)."""
    ids, masks, targets = [], [], []
    for i in range(instr_ids.shape[0]):
        n = int(instr_mask[i].sum())
        row = torch.cat([instr_ids[i, :n], resp_ids[i, 1:], instr_ids[i, n:]])
        ids.append(row)
        masks.append(torch.cat([instr_mask[i, :n], resp_mask[i, 1:], instr_mask[i, n:]]))
        tgt = row.masked_fill(row == pad_id, -100)
        tgt[:n] = -100
        targets.append(torch.cat([torch.full((q,), -100), tgt]))
    return torch.stack(ids), torch.stack(masks), torch.stack(targets)


def test_pack_instruction_response_by_hand():
    p = 32000  # Vicuna pad
    instr = torch.tensor([[2, 11, 12, p], [2, 21, 22, 23]])
    instr_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    resp = torch.tensor([[2, 31, 2, p, p], [2, 41, 42, 43, 2]])  # "... </s>" (id 2), right padded
    resp_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = losses.pack_instruction_response(instr, instr_mask, resp, resp_mask, p, num_query_tokens=2)
    assert out.input_ids.tolist() == [[2, 11, 12, 31, 2, p, p, p], [2, 21, 22, 23, 41, 42, 43, 2]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]]
    assert out.targets.tolist() == [
        [-100, -100, -100, -100, -100, 31, 2, -100, -100, -100],
        [-100, -100, -100, -100, -100, -100, 41, 42, 43, 2],
    ]
    assert out.instruction_lengths.tolist() == [3, 4]


def test_pack_instruction_response_matches_loop_on_random_lengths():
    gen = torch.Generator().manual_seed(3)
    p, b, li, lr = 99, 6, 7, 5
    instr = torch.randint(3, 90, (b, li), generator=gen)
    resp = torch.randint(3, 90, (b, lr), generator=gen)
    instr[:, 0] = resp[:, 0] = 2
    n_i = torch.randint(1, li + 1, (b,), generator=gen)
    n_r = torch.randint(1, lr + 1, (b,), generator=gen)
    instr_mask = (torch.arange(li) < n_i[:, None]).long()
    resp_mask = (torch.arange(lr) < n_r[:, None]).long()
    instr = instr.masked_fill(instr_mask == 0, p)
    resp = resp.masked_fill(resp_mask == 0, p)
    out = losses.pack_instruction_response(instr, instr_mask, resp, resp_mask, p, num_query_tokens=3)
    ids, mask, targets = _pack_loop(instr, instr_mask, resp, resp_mask, p, 3)
    assert torch.equal(out.input_ids, ids)
    assert torch.equal(out.attention_mask, mask)
    assert torch.equal(out.targets, targets)
    # Real tokens are contiguous at the front of every row.
    assert torch.equal(out.attention_mask, (torch.arange(li + lr - 1) < (n_i + n_r - 1)[:, None]).long())


def test_pack_instruction_response_rejects_left_padding():
    instr = torch.tensor([[0, 2, 5]])
    with pytest.raises(LossInputError, match="right-padded"):
        losses.pack_instruction_response(
            instr, torch.tensor([[0, 1, 1]]), torch.tensor([[2, 3]]), torch.ones(1, 2), 0, num_query_tokens=1
        )


def test_seq2seq_targets_and_loss():
    ids = torch.tensor([[5, 6, 1, 0], [7, 1, 0, 0]])  # T5: </s> = 1, pad = 0
    labels = losses.seq2seq_targets(ids, pad_id=0)
    assert labels.tolist() == [[5, 6, 1, -100], [7, 1, -100, -100]]
    logits = torch.randn(2, 4, 9, dtype=torch.float64)
    # No shift: position t predicts labels[t]; equal to the shifted loss on labels moved right by one.
    shifted = torch.cat([torch.full((2, 1), -100), labels], dim=1)
    padded_logits = torch.cat([logits, torch.zeros(2, 1, 9, dtype=torch.float64)], dim=1)
    expected = _shifted_ce_loop(padded_logits, shifted, 0.0)
    assert losses.seq2seq_lm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.gpu
def test_stage1_losses_on_cuda_match_cpu():
    image, text = _normed(4, 3, 8).float(), _normed(4, 8).float()
    ids = torch.tensor([1, 2, 1, 3])
    cpu = losses.itc_loss(image, text, 0.07, image_ids=ids)
    gpu = losses.itc_loss(image.cuda(), text.cuda(), torch.tensor(0.07, device="cuda"), image_ids=ids.cuda())
    torch.testing.assert_close(gpu.loss.cpu(), cpu.loss)
    gen = torch.Generator(device="cuda").manual_seed(0)
    neg = losses.sample_itm_negatives(gpu.sim_i2t, gpu.sim_t2i, gpu.positive_mask, generator=gen)
    assert not gpu.positive_mask.gather(1, neg.image_index[:, None]).any()
    with torch.autocast("cuda", dtype=torch.float16):
        half = losses.itc_loss(image.cuda(), text.cuda(), 0.07)
    torch.testing.assert_close(half.loss.cpu(), losses.itc_loss(image, text, 0.07).loss, atol=0.02, rtol=0)
