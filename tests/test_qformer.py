"""Q-Former: mask modes, KV cache, variants, attention paths, dropout, MLM head."""

from __future__ import annotations

import pytest
import torch

from vlkit.config import from_dict, to_dict
from vlkit.errors import ConfigError
from vlkit.models.qformer import QFormer, QFormerConfig, self_attention_mask

Q, T, N = 4, 6, 9


def tiny(**kw) -> QFormerConfig:
    base = dict(
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        intermediate_size=40,
        encoder_width=24,
        vocab_size=50,
        max_position_embeddings=16,
    )
    return QFormerConfig(**{**base, **kw})


def _inputs(batch: int = 2):
    queries = torch.randn(batch, Q, 32)
    ids = torch.randint(1, 50, (batch, T))
    mask = torch.ones(batch, T, dtype=torch.long)
    mask[1, -2:] = 0
    image = torch.randn(batch, N, 24)
    return queries, ids, mask, image


@pytest.fixture
def qformer():
    return QFormer(tiny()).eval()


def test_config_validation_and_round_trip():
    cfg = tiny()
    assert from_dict(QFormerConfig, to_dict(cfg)) == cfg
    assert [cfg.has_cross_attention(i) for i in range(4)] == [True, False, True, False]
    with pytest.raises(ConfigError, match="lm_head=True needs text_input"):
        tiny(text_input=False)
    with pytest.raises(ConfigError, match="divisible"):
        tiny(num_heads=5)
    with pytest.raises(ConfigError, match="cross_attention_freq"):
        tiny(cross_attention_freq=0)


def test_mask_matrix_is_the_reference_layout():
    """2 queries, 3 text tokens (last one padding), multimodal causal."""
    text_mask = torch.tensor([[1, 1, 0]])
    m = self_attention_mask(
        text_mask,
        batch=1,
        query_len=2,
        new_query_len=2,
        past_text_len=0,
        new_text_len=3,
        causal=True,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    keep = (m[0, 0] == 0).int().tolist()
    assert keep == [
        [1, 1, 0, 0, 0],  # queries see queries only
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # text t sees all queries and text <= t
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],  # the pad key stays hidden
    ]
    assert set(m.unique().tolist()) == {0.0, -10000.0}
    bi = self_attention_mask(
        text_mask,
        batch=1,
        query_len=2,
        new_query_len=2,
        past_text_len=0,
        new_text_len=3,
        causal=False,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    assert bi.shape == (1, 1, 1, 5) and (bi[0, 0, 0] == 0).int().tolist() == [1, 1, 1, 1, 0]
    assert (
        self_attention_mask(
            None,
            batch=1,
            query_len=2,
            new_query_len=2,
            past_text_len=0,
            new_text_len=0,
            causal=False,
            dtype=torch.float32,
            device=torch.device("cpu"),
        )
        is None
    )


def test_unimodal_modes_do_not_mix(qformer):
    queries, ids, mask, image = _inputs()
    with torch.no_grad():
        q_only = qformer(queries, image_embeds=image).hidden_states
        t_only = qformer(input_ids=ids, attention_mask=mask).hidden_states
        assert q_only.shape == (2, Q, 32) and t_only.shape == (2, T, 32)
        # Text-only output ignores padding tokens' values.
        ids2 = ids.clone()
        ids2[1, -2:] = 7
        t2 = qformer(input_ids=ids2, attention_mask=mask).hidden_states
        torch.testing.assert_close(t2[1, :-2], t_only[1, :-2], atol=1e-6, rtol=0)


def test_bidirectional_mode_queries_see_text(qformer):
    queries, ids, mask, image = _inputs()
    with torch.no_grad():
        joint = qformer(queries, ids, mask, image)
        q_only = qformer(queries, image_embeds=image).hidden_states
    assert joint.query_output.shape == (2, Q, 32) and joint.text_output.shape == (2, T, 32)
    assert (joint.query_output - q_only).abs().max() > 1e-3


def test_causal_mode_queries_blind_to_text_and_text_causal(qformer):
    queries, ids, mask, image = _inputs()
    with torch.no_grad():
        joint = qformer(queries, ids, mask, image, causal=True)
        q_only = qformer(queries, image_embeds=image).hidden_states
        torch.testing.assert_close(joint.query_output, q_only, atol=1e-5, rtol=0)
        changed = ids.clone()
        changed[:, 3:] = 5  # future tokens must not affect positions < 3
        other = qformer(queries, changed, mask, image, causal=True)
        torch.testing.assert_close(other.text_output[:, :3], joint.text_output[:, :3], atol=1e-5, rtol=0)
        assert (other.text_output[:, 3:] - joint.text_output[:, 3:]).abs().max() > 1e-3


def test_cached_queries_equal_the_joint_causal_pass(qformer):
    """ITG: text over cached query K/V == the joint multimodal-causal sequence (queries recomputed)."""
    queries, ids, mask, image = _inputs()
    with torch.no_grad():
        cached = qformer(queries, image_embeds=image, use_cache=True)
        assert cached.cache.query_len == Q and cached.cache.text_len == 0 and len(cached.cache.layers) == 3
        text = qformer(input_ids=ids, attention_mask=mask, causal=True, past=cached.cache)
        joint = qformer(queries, ids, mask, image, causal=True)
    torch.testing.assert_close(text.hidden_states, joint.text_output, atol=1e-5, rtol=0)


def test_token_by_token_decoding_with_cache(qformer):
    queries, ids, _, image = _inputs()
    with torch.no_grad():
        cache = qformer(queries, image_embeds=image, use_cache=True).cache
        full = qformer(input_ids=ids, causal=True, past=cache).hidden_states
        steps = []
        for t in range(T):
            out = qformer(input_ids=ids[:, t : t + 1], causal=True, past=cache, use_cache=True)
            cache = out.cache
            steps.append(out.hidden_states)
        assert cache.text_len == T
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_cache_reorder_for_beams(qformer):
    queries, ids, _, image = _inputs()
    with torch.no_grad():
        cache = qformer(queries, image_embeds=image, use_cache=True).cache
        beams = cache.repeat_interleave(3)
        assert beams.batch_size == 6
        out = qformer(input_ids=ids.repeat_interleave(3, 0), causal=True, past=beams).hidden_states
        ref = qformer(input_ids=ids, causal=True, past=cache).hidden_states
        torch.testing.assert_close(out[::3], ref, atol=1e-6, rtol=0)
        swapped = cache.index_select(torch.tensor([1, 0]))
        torch.testing.assert_close(swapped.layers[0][0][0], cache.layers[0][0][1])


def test_text_positions_start_at_zero_and_cross_attention_layout(qformer):
    assert [layer.cross_attn is not None for layer in qformer.layers] == [True, False, True]
    freq3 = QFormer(tiny(cross_attention_freq=3, num_layers=4))
    assert [layer.cross_attn is not None for layer in freq3.layers] == [True, False, False, True]
    assert qformer.layers[0].cross_attn.key.in_features == 24
    queries, ids, _, _ = _inputs()
    with torch.no_grad():
        # Text positions do not depend on how many queries precede them: position ids are 0..T-1 in both.
        expected = qformer.embed_norm(qformer.word_embed(ids) + qformer.pos_embed.weight[:T])
        qformer.layers = qformer.layers[:0]  # look at the embedding output alone
        torch.testing.assert_close(qformer(input_ids=ids).hidden_states, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(qformer(queries, ids).text_output, expected, atol=1e-6, rtol=0)
        # ...and the queries get no position embedding: just the shared LayerNorm.
        torch.testing.assert_close(qformer(queries, ids).query_output, qformer.embed_norm(queries), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("mode", ["queries", "text", "bidirectional", "causal", "cached"])
def test_sdpa_and_eager_agree(dtype, atol, mode):
    model = QFormer(tiny()).to(dtype).eval()
    queries, ids, mask, image = _inputs()
    queries, image = queries.to(dtype), image.to(dtype)

    def run():
        if mode == "queries":
            return model(queries, image_embeds=image).hidden_states
        if mode == "text":
            return model(input_ids=ids, attention_mask=mask).hidden_states
        if mode == "cached":
            cache = model(queries, image_embeds=image, use_cache=True).cache
            return model(input_ids=ids, attention_mask=mask, causal=True, past=cache).hidden_states
        return model(queries, ids, mask, image, causal=mode == "causal").hidden_states

    with torch.no_grad():
        fast = run()
        for m in model.modules():
            if hasattr(m, "attn_impl"):
                m.attn_impl = "eager"
        ref = run()
    assert fast.dtype == dtype
    torch.testing.assert_close(fast.float(), ref.float(), atol=atol, rtol=0)


def test_variants():
    stage2 = QFormer(tiny(text_input=False, lm_head=False))
    assert stage2.word_embed is None and stage2.pos_embed is None and stage2.lm_head is None
    assert all(layer.text_ffn is None for layer in stage2.layers)
    keys = stage2.state_dict().keys()
    assert not any("word_embed" in k or "text_ffn" in k or "lm_head" in k for k in keys)
    queries, ids, _, image = _inputs()
    assert stage2(queries, image_embeds=image).hidden_states.shape == (2, Q, 32)
    with pytest.raises(ConfigError, match="no text input"):
        stage2(queries, ids, image_embeds=image)
    instruct = QFormer(tiny(lm_head=False))
    assert instruct.word_embed is not None and instruct.lm_head is None
    assert instruct(queries, ids, image_embeds=image).query_output.shape == (2, Q, 32)
    with pytest.raises(ConfigError, match="no MLM head"):
        instruct.lm_logits(torch.randn(1, 2, 32))


def test_lm_head_is_tied_to_word_embeddings(qformer):
    h = torch.randn(2, 3, 32)
    with torch.no_grad():
        before = qformer.lm_logits(h)
        assert before.shape == (2, 3, 50)
        qformer.word_embed.weight[7] += 1.0
        after = qformer.lm_logits(h)
    changed = (after - before).abs().amax(dim=(0, 1)) > 0
    assert changed[7] and changed.sum() == 1
    assert not any("decoder" in k for k in qformer.state_dict())


def test_dropout_only_in_train_mode(qformer):
    queries, ids, mask, image = _inputs()
    with torch.no_grad():
        assert torch.equal(
            qformer(queries, ids, mask, image).hidden_states, qformer(queries, ids, mask, image).hidden_states
        )
        qformer.train()
        a = qformer(queries, ids, mask, image).hidden_states
        b = qformer(queries, ids, mask, image).hidden_states
    assert not torch.equal(a, b)


def test_query_ffn_init_from_text(qformer):
    qformer.init_query_ffn_from_text()
    for layer in qformer.layers:
        for (_, a), (_, b) in zip(layer.query_ffn.state_dict().items(), layer.text_ffn.state_dict().items()):
            assert torch.equal(a, b)


def test_bad_calls():
    model = QFormer(tiny())
    queries, ids, mask, image = _inputs()
    with pytest.raises(ValueError, match="needs query_embeds"):
        model()
    cache = model(queries, image_embeds=image, use_cache=True).cache
    with pytest.raises(ValueError, match="queries must come first"):
        model(queries, past=cache)
    with pytest.raises(ValueError, match="image_embeds are required"):
        model(queries)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(input_ids=ids, attention_mask=mask[:, :3])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=torch.ones(1, 17, dtype=torch.long))


def test_image_mask_hides_image_tokens(qformer):
    queries, _, _, image = _inputs()
    keep = torch.ones(2, N, dtype=torch.long)
    keep[:, -3:] = 0
    with torch.no_grad():
        masked = qformer(queries, image_embeds=image, image_mask=keep).hidden_states
        cropped = qformer(queries, image_embeds=image[:, :-3]).hidden_states
    torch.testing.assert_close(masked, cropped, atol=1e-5, rtol=0)
