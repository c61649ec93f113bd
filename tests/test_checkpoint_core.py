import pytest
import torch
from torch import nn

from vlkit.checkpoints.io import read_checkpoint, save_safetensors, save_torch, state_dict_of
from vlkit.checkpoints.keymap import load_exact, map_keys
from vlkit.errors import CheckpointError


def test_map_keys_patterns_and_drops():
    sd = {"blocks.0.w": torch.ones(1), "blocks.11.w": torch.zeros(1), "pos_ids": torch.arange(3), "head": torch.ones(2)}
    rules = {"blocks.{i}.w": "layers.{i}.weight", "pos_ids": None, "head": "out.weight"}
    out = map_keys(sd, rules)
    assert sorted(out) == ["layers.0.weight", "layers.11.weight", "out.weight"]
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\).*extra"):
        map_keys({**sd, "extra": torch.ones(1)}, rules, source="ck")
    with pytest.raises(CheckpointError, match="two keys map"):
        map_keys({"a": torch.ones(1), "b": torch.ones(1)}, {"a": "x", "b": "x"})


def test_load_exact_reports_everything():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    good = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    load_exact(model, good)
    assert torch.all(model[0].weight == 0.5)
    bad = dict(good)
    del bad["1.bias"]
    bad["2.weight"] = torch.ones(1)
    bad["0.weight"] = torch.ones(4, 2)
    with pytest.raises(CheckpointError) as err:
        load_exact(model, bad, source="x.pth")
    msg = str(err.value)
    assert "missing 1 key(s): 1.bias" in msg and "unexpected 1 key(s): 2.weight" in msg and "0.weight" in msg
    del bad["2.weight"]
    bad["0.weight"] = good["0.weight"]
    load_exact(model, bad, allow_missing=lambda k: k == "1.bias")


def test_read_checkpoint_formats_and_refuses_code(tmp_path):
    sd = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    save_safetensors(sd, tmp_path / "w.safetensors")
    save_torch({"model": sd, "epoch": 3}, tmp_path / "w.pth")
    assert torch.equal(read_checkpoint(tmp_path / "w.safetensors")["a"], sd["a"])
    assert torch.equal(state_dict_of(read_checkpoint(tmp_path / "w.pth"), source="w")["b"], sd["b"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights-only"):
        read_checkpoint(tmp_path / "evil.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        read_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "none.pth")


def test_atomic_save_leaves_no_temp_files(tmp_path):
    save_safetensors({"x": torch.ones(3)}, tmp_path / "sub" / "m.safetensors")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["m.safetensors"]
