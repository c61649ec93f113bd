"""unilm VLMo checkpoints: file layouts, safe reading, key accounting, heads, resizing, export round trip."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
import torch.nn.functional as F
from test_vlmo_reference import random_unilm_state_dict, unilm_keys

from vlkit.checkpoints.unilm import (
    UNILM_KEY_MAP,
    convert_unilm_state_dict,
    export_unilm_state_dict,
    infer_unilm_config,
    load_unilm,
    read_unilm_state_dict,
    save_unilm_checkpoint,
)
from vlkit.errors import CheckpointError
from vlkit.layers import relpos
from vlkit.models.vlmo import VLMo, VLMoConfig

TINY = VLMoConfig.preset("tiny", heads=("vqa",))
TINY_ABS = VLMoConfig.preset("tiny", position="absolute", layer_scale_init=None, heads=("irtr",))


def _labels_as_in(cfg: VLMoConfig, inferred: VLMoConfig) -> VLMoConfig:
    """``cfg`` with the fields a file cannot tell taken from ``inferred``: the VQA label count without a VQA
    head, the bias table's text length without a bias table."""
    if "vqa" not in cfg.heads:
        cfg = dataclasses.replace(cfg, vqa_num_labels=inferred.vqa_num_labels)
    if cfg.position == "absolute":
        cfg = dataclasses.replace(cfg, max_text_len_of_initckpt=inferred.max_text_len_of_initckpt)
    return cfg


def _same_weights(a: VLMo, b: VLMo) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(
    "cfg",
    [
        TINY,
        TINY_ABS,
        VLMoConfig.preset("tiny", heads=("mlm", "itm", "itc")),
        VLMoConfig.preset("tiny", heads=("nlvr2",), vlffn_start_layer=4),
    ],
)
def test_export_has_the_reference_layout_and_round_trips(cfg, tmp_path):
    model = VLMo(cfg)
    exported = export_unilm_state_dict(model)
    layout = unilm_keys(cfg)
    assert {k: tuple(v.shape) for k, v in exported.items()} == layout
    if cfg.position == "relative":
        assert exported["text_imag_relative_position_index"].dtype == torch.float32  # as the reference
        assert exported["relative_position_index"].dtype == torch.int64
    save_unilm_checkpoint(model, tmp_path / "m.ckpt")
    again = VLMo(cfg)
    report = load_unilm(again, tmp_path / "m.ckpt")
    assert report.resized == [] and report.dropped_heads == [] and report.initialised_heads == []
    _same_weights(model, again)
    inferred = infer_unilm_config(exported, **({"num_heads": cfg.num_heads} if cfg.position == "absolute" else {}))
    assert inferred == _labels_as_in(cfg, inferred)


def test_key_map_accounts_for_every_reference_key():
    cfg = VLMoConfig.preset("tiny", heads=("mlm", "itm", "itc", "vqa", "nlvr2"))
    sd = random_unilm_state_dict(cfg)
    out, _ = convert_unilm_state_dict(sd, cfg)
    dropped = {k for k in sd if k.endswith("index") or k.startswith("text_embeddings.position_ids")}
    assert len(out) == len(sd) - len(dropped) == len(VLMo(cfg, device="meta").state_dict())
    assert dropped == {
        "relative_position_index",
        "text_relative_position_index",
        "text_imag_relative_position_index",
        "text_embeddings.position_ids",
    }
    assert all(UNILM_KEY_MAP[k] is None for k in dropped)


@pytest.mark.parametrize("layout", ["state_dict", "module", "model", "bare"])
def test_file_layouts(layout, tmp_path):
    sd = random_unilm_state_dict(TINY)
    if layout == "state_dict":
        obj = {"state_dict": sd, "epoch": 3, "global_step": 10, "pytorch-lightning_version": "1.5.5"}
    elif layout == "module":  # DeepSpeed
        obj = {"module": {f"module.{k}": v for k, v in sd.items()}}
    elif layout == "model":
        obj = {"model": sd}
    else:
        obj = sd
    torch.save(obj, tmp_path / "w.pt")
    loaded = read_unilm_state_dict(tmp_path / "w.pt")
    assert loaded.keys() == sd.keys()
    model = VLMo(TINY)
    load_unilm(model, tmp_path / "w.pt")
    assert torch.equal(model.blocks[1].attn.qkv.weight, sd["transformer.blocks.1.attn.qkv.weight"])


TOUCHED = []


class TrainingConfig(dict):
    """Stands for sacred's ReadOnlyDict in a Lightning checkpoint's hyper_parameters."""

    def __setstate__(self, state):
        TOUCHED.append("setstate")

    def __reduce__(self):
        return (_record_call, ("reduce",), {"x": 1})


def _record_call(tag):
    TOUCHED.append(tag)
    return TrainingConfig()


def test_lightning_checkpoint_with_pickled_objects_is_read_without_running_them(tmp_path):
    sd = random_unilm_state_dict(TINY)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": sd, "hyper_parameters": {"config": TrainingConfig(a=1)}, "epoch": 1}, path)
    with pytest.raises(pickle.UnpicklingError):  # the plain weights-only loader refuses this file
        torch.load(path, weights_only=True)
    TOUCHED.clear()
    loaded = read_unilm_state_dict(path)
    assert TOUCHED == []  # neither the pickled callable nor __setstate__ ran
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_unreadable_or_foreign_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        read_unilm_state_dict(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="no such"):
        read_unilm_state_dict(tmp_path / "missing.pt")
    torch.save({"state_dict": {"a": 1}}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="non-tensor"):
        read_unilm_state_dict(tmp_path / "odd.pt")


def test_unknown_keys_and_backbone_mismatch_are_listed():
    sd = random_unilm_state_dict(TINY)
    sd["transformer.blocks.0.attn.qkv.bias"] = torch.zeros(96)
    with pytest.raises(CheckpointError, match=r"transformer\.blocks\.0\.attn\.qkv\.bias"):
        load_unilm(VLMo(TINY), sd)
    sd = random_unilm_state_dict(TINY)
    with pytest.raises(CheckpointError, match="blocks.1.ffn_vl"):  # VL experts start one layer lower
        load_unilm(VLMo(VLMoConfig.preset("tiny", heads=("vqa",), vlffn_start_layer=1)), sd)
    with pytest.raises(CheckpointError, match="relative_position_bias_table.*missing.*pos_embed"):  # abs model
        load_unilm(VLMo(VLMoConfig.preset("tiny", heads=("vqa",), position="absolute")), sd)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_unilm(VLMo(VLMoConfig.preset("tiny", heads=("vqa",), vqa_num_labels=11)), sd)


def test_heads_present_or_absent():
    pretrained = random_unilm_state_dict(VLMoConfig.preset("tiny", heads=("mlm", "itm", "itc")))
    vqa_model = VLMo(TINY)
    with pytest.raises(CheckpointError) as err:
        load_unilm(vqa_model, pretrained)
    msg = str(err.value)
    assert "itc, itm, mlm" in msg and "mlm_score.decoder.weight" in msg and "drop_heads" in msg
    with pytest.raises(CheckpointError, match=r"lacks task heads.*vqa_head\.fc1\.weight.*init_heads"):
        load_unilm(vqa_model, pretrained, drop_heads=("mlm", "itm", "itc"))
    fresh = vqa_model.vqa_head.fc2.weight.clone()
    report = load_unilm(vqa_model, pretrained, drop_heads=("mlm", "itm", "itc"), init_heads=("vqa",))
    assert report.dropped_heads == ["itc", "itm", "mlm"] and report.initialised_heads == ["vqa"]
    assert torch.equal(vqa_model.vqa_head.fc2.weight, fresh)
    assert torch.equal(vqa_model.pooler.weight, pretrained["pooler.dense.weight"])
    # Retrieval fine-tuning from a pretrained file keeps the shared ITC projections, drops the VL ones.
    irtr = VLMo(VLMoConfig.preset("tiny", heads=("irtr",)))
    report = load_unilm(irtr, pretrained, drop_heads=("mlm", "itm", "itc"))
    assert torch.equal(irtr.itc_text_proj.weight, pretrained["itc_text_proj.fc.weight"])
    assert torch.equal(irtr.logit_scale, pretrained["logit_scale"])


def test_nlvr2_from_two_token_types():
    sd = random_unilm_state_dict(TINY)
    model = VLMo(VLMoConfig.preset("tiny", heads=("nlvr2",)))
    report = load_unilm(model, sd, drop_heads=("vqa",), init_heads=("nlvr2",))
    tt = sd["token_type_embeddings.weight"]
    assert torch.equal(model.token_type.weight, torch.cat([tt, tt[1:]]))
    assert any("token types" in note for note in report.resized)


def test_bias_table_resized_to_another_resolution():
    sd = random_unilm_state_dict(TINY)  # 32 px / patch 8: 4x4 grid
    cfg = VLMoConfig.preset("tiny", heads=("vqa",), image_size=56)  # 7x7 grid
    model = VLMo(cfg)
    report = load_unilm(model, sd)
    assert report.resized == ["relative position bias resampled from a 4x4 to a 7x7 grid"]
    src = sd["relative_position_bias_table"]
    extra = relpos.num_extra_rows(cfg.max_text_len_of_initckpt)
    expected = relpos.resample_offset_grid(src[:-extra], 7, 13)
    assert torch.equal(model.rel_pos_table[:-extra], expected)
    assert torch.equal(model.rel_pos_table[-extra:], src[-extra:])
    ids = torch.randint(1, 64, (1, 8))
    assert model.vqa_logits(ids, None, torch.randn(1, 3, 56, 56)).shape == (1, 10)
    # Same-size load leaves the table untouched.
    same = VLMo(TINY)
    load_unilm(same, sd)
    assert torch.equal(same.rel_pos_table, src)
    bad = dict(sd, relative_position_bias_table=torch.randn(src.shape[0] + 1, src.shape[1]))
    with pytest.raises(CheckpointError, match="square patch grid"):
        load_unilm(VLMo(cfg), bad)


def test_absolute_positions_resized_bicubically():
    sd = random_unilm_state_dict(TINY_ABS)  # 4x4 grid
    cfg = VLMoConfig.preset("tiny", position="absolute", layer_scale_init=None, heads=("irtr",), image_size=48)
    model = VLMo(cfg)
    load_unilm(model, sd)
    pos = sd["transformer.pos_embed"]
    grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = (
        F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, -1)
    )
    assert torch.equal(model.pos_embed[:, :1], pos[:, :1])
    torch.testing.assert_close(model.pos_embed[:, 1:], expected)


def test_text_positions_truncated_not_extended():
    long_cfg = VLMoConfig.preset("tiny", heads=("vqa",), max_text_len=12)
    sd = random_unilm_state_dict(long_cfg)
    model = VLMo(TINY)  # max_text_len 8
    report = load_unilm(model, sd)
    assert torch.equal(model.text_embed.position.weight, sd["text_embeddings.position_embeddings.weight"][:8])
    assert report.resized == ["text positions truncated from 12 to 8"]
    with pytest.raises(CheckpointError, match="fewer than max_text_len"):
        load_unilm(VLMo(long_cfg), random_unilm_state_dict(TINY))


def test_checkpoint_without_released_buffers_loads():
    sd = random_unilm_state_dict(TINY)
    for k in ("relative_position_index", "text_relative_position_index", "text_imag_relative_position_index"):
        del sd[k]
    del sd["text_embeddings.position_ids"]
    model = VLMo(TINY)
    load_unilm(model, sd)
    assert torch.equal(model.rel_pos_table, sd["relative_position_bias_table"])


def test_infer_config_from_released_layout():
    cfg = VLMoConfig.preset("tiny", heads=("mlm", "itm", "itc"), image_size=40)
    sd = random_unilm_state_dict(cfg)
    inferred = infer_unilm_config(sd)
    assert inferred == _labels_as_in(cfg, inferred)  # T0 recovered from relative_position_index
    assert infer_unilm_config(sd, image_size=64).image_size == 64
    with pytest.raises(CheckpointError, match="not a unilm VLMo"):
        infer_unilm_config({"foo": torch.zeros(1)})
