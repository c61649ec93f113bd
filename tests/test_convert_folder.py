"""The vlkit folder format (config.yaml + model.safetensors) and load_model's dispatch and errors."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from vlkit import zoo
from vlkit.checkpoints.folder import load_model, read_config, save_pretrained
from vlkit.errors import CheckpointError, ConfigError


@pytest.fixture
def folder(tmp_path):
    model = zoo.build("tiny-blip2-clip")
    save_pretrained(model, tmp_path / "m", preset="tiny-blip2-clip", source="test")
    return model, tmp_path / "m"


def test_folder_layout_and_loading(folder):
    model, path = folder
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "model.safetensors"]
    meta = yaml.safe_load((path / "config.yaml").read_text())
    assert (
        meta["arch"] == "blip2" and meta["preset"] == "tiny-blip2-clip" and meta["config"]["vision"]["kind"] == "clip"
    )
    arch, config = read_config(path)
    assert arch == "blip2" and config == model.config
    loaded = load_model(path, dtype=torch.bfloat16)
    assert loaded.query_tokens.dtype == torch.bfloat16 and not loaded.training
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = model.eval().encode_image(pixels)
        b = load_model(path).encode_image(pixels)
    assert torch.equal(a, b)


def test_config_errors_name_the_key(folder):
    _, path = folder
    meta = yaml.safe_load((path / "config.yaml").read_text())
    meta["config"]["vision"]["widht"] = 3
    (path / "config.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(ConfigError, match="widht"):
        load_model(path)
    del meta["config"]["vision"]["widht"]
    (path / "config.yaml").write_text(yaml.safe_dump({**meta, "arch": "blip3"}))
    with pytest.raises(ConfigError, match="unknown arch 'blip3'"):
        load_model(path)
    (path / "config.yaml").write_text(yaml.safe_dump({**meta, "epoch": 3}))
    with pytest.raises(ConfigError, match="epoch"):
        load_model(path)


def test_weight_errors_list_the_keys(folder):
    _, path = folder
    weights = load_file(path / "model.safetensors")
    del weights["itm_head.bias"]
    weights["extra.weight"] = torch.ones(1)
    weights["query_tokens"] = torch.ones(1, 5, 32)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    msg = str(err.value)
    assert "missing 1 key(s): itm_head.bias" in msg and "unexpected 1 key(s): extra.weight" in msg
    assert "query_tokens: checkpoint (1, 5, 32) vs model (1, 4, 32)" in msg


def test_dispatch_errors(folder, tmp_path):
    _, path = folder
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a vlkit folder"):
        load_model(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="only apply to LAVIS"):
        load_model(path, vision=tmp_path / "eva.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(tmp_path / "junk.pth", preset="tiny-blip2-eva")
