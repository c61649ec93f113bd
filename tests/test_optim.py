import pytest
import torch
from torch import nn

from vlkit.errors import ConfigError
from vlkit.training.optim import build_optimizer, is_no_decay, param_groups, set_learning_rates
from vlkit.training.recipe import OptimConfig


class Blip2Like(nn.Module):
    """Parameter names and shapes of the cases that matter in BLIP-2 / VLMo."""

    def __init__(self) -> None:
        super().__init__()
        self.temp = nn.Parameter(torch.tensor(0.07))  # 0-D
        self.query_tokens = nn.Parameter(torch.zeros(1, 4, 8))  # 3-D
        self.ln_vision = nn.LayerNorm(8)  # 1-D weight and bias
        self.proj = nn.Linear(8, 8)  # 2-D weight, 1-D bias
        self.relative_position_bias_table = nn.Parameter(torch.zeros(5, 2))  # 2-D, "bias" inside the name
        self.norm2_text = nn.LayerNorm(8)
        self.norm1 = nn.LayerNorm(8)
        self.logit_scale = nn.Parameter(torch.ones([]))


def decayed(model: nn.Module, rule: str) -> set[str]:
    groups, infos = param_groups(model.named_parameters(), OptimConfig(weight_decay=0.05, no_decay=rule))
    return {n for info in infos if info.weight_decay > 0 for n in info.names}


def test_blip2_rule_is_lavis_len_shape_eq_1_or_dot_bias():
    # LAVIS Blip2Base.get_optimizer_params: `len(param.shape) == 1 or name.endswith(".bias")` -> no decay.
    got = decayed(Blip2Like(), "blip2")
    assert got == {"temp", "query_tokens", "proj.weight", "relative_position_bias_table", "logit_scale"}
    assert not is_no_decay("temp", torch.zeros(()), "blip2")  # 0-D is decayed: len(()) == 0, not 1


def test_vlmo_rule_is_substring_match():
    got = decayed(Blip2Like(), "vlmo")
    # "bias" matches relative_position_bias_table; norm2_text.weight matches no entry of the list
    assert got == {"temp", "query_tokens", "ln_vision.weight", "proj.weight", "norm2_text.weight", "logit_scale"}


def test_ndim_rule_excludes_scalars():
    got = decayed(Blip2Like(), "ndim<2")
    assert got == {"query_tokens", "proj.weight", "relative_position_bias_table"}


def test_frozen_parameters_are_left_out():
    model = Blip2Like()
    model.proj.requires_grad_(False)
    _, infos = param_groups(model.named_parameters(), OptimConfig())
    names = {n for info in infos for n in info.names}
    assert "proj.weight" not in names and "proj.bias" not in names and "temp" in names


def vit_layer_id(name: str) -> int | None:
    """LAVIS EVA ViT-g get_num_layer for a 3-block ViT (block i -> i + 1, embeddings 0, rest 3)."""
    if not name.startswith("visual_encoder."):
        return None
    name = name[len("visual_encoder.") :]
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return 3


class TinyVit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.patch_embed = nn.Linear(4, 4)
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.norm = nn.LayerNorm(4)


class WithVit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual_encoder = TinyVit()
        self.head = nn.Linear(4, 2)


def test_layer_decay_scales_match_lavis_formula():
    decay, vit_num_layers = 0.9, 3  # LAVIS: lr_scales[i] = decay ** (vit_num_layers + 1 - i)
    lavis_scales = [decay ** (vit_num_layers + 1 - i) for i in range(vit_num_layers + 2)]
    model = WithVit()
    cfg = OptimConfig(layer_decay=decay)
    groups, infos = param_groups(model.named_parameters(), cfg, layer_id=vit_layer_id, num_layers=vit_num_layers + 1)
    for info in infos:
        for name in info.names:
            layer = vit_layer_id(name)
            expected = 1.0 if layer is None else lavis_scales[layer]
            assert info.lr_scale == pytest.approx(expected), name
    assert [g["lr"] for g in groups] == pytest.approx([cfg.lr * info.lr_scale for info in infos])


def test_layer_decay_really_changes_the_update():
    # First AdamW step moves every weight by ~lr (m / sqrt(v) = +-1): the size of the move shows the lr used.
    torch.manual_seed(0)
    model = WithVit()
    cfg = OptimConfig(lr=1e-2, weight_decay=0.0, layer_decay=0.5)
    opt, infos = build_optimizer(model, cfg, layer_id=vit_layer_id, num_layers=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.visual_encoder.blocks[0](torch.randn(3, 4)).sum().backward()
    model.head(torch.randn(3, 4)).sum().backward()
    set_learning_rates(opt, 1e-2)
    opt.step()
    moved = (model.visual_encoder.blocks[0].weight - before["visual_encoder.blocks.0.weight"]).abs().max().item()
    assert moved == pytest.approx(1e-2 * 0.5**3, rel=1e-3)  # block 0 = layer 1 -> 0.5 ** (4 - 1)
    moved_head = (model.head.weight - before["head.weight"]).abs().max().item()
    assert moved_head == pytest.approx(1e-2, rel=1e-3)


def test_layer_decay_needs_layer_ids():
    with pytest.raises(ConfigError, match="layer_decay"):
        param_groups(WithVit().named_parameters(), OptimConfig(layer_decay=0.9))
    with pytest.raises(ConfigError, match="outside"):
        param_groups(WithVit().named_parameters(), OptimConfig(layer_decay=0.9), layer_id=lambda n: 7, num_layers=4)


def test_lr_mult_by_name():
    model = nn.ModuleDict({"backbone": nn.Linear(2, 2), "vqa_classifier": nn.Linear(2, 3)})
    groups, infos = param_groups(model.named_parameters(), OptimConfig(lr=1e-4, lr_mult={"vqa_classifier": 20.0}))
    scales = {n: info.lr_scale for info in infos for n in info.names}
    assert scales == {
        "backbone.weight": 1.0,
        "backbone.bias": 1.0,
        "vqa_classifier.weight": 20.0,
        "vqa_classifier.bias": 20.0,
    }
    assert sorted(g["lr"] for g in groups) == pytest.approx([1e-4, 1e-4, 2e-3, 2e-3])


def test_lr_mult_errors():
    model = nn.ModuleDict({"backbone": nn.Linear(2, 2), "vqa_classifier": nn.Linear(2, 3)})
    with pytest.raises(ConfigError, match="match no trainable parameter"):
        param_groups(model.named_parameters(), OptimConfig(lr_mult={"nlvr2_classifier": 20.0}))
    with pytest.raises(ConfigError, match="disjoint"):
        param_groups(model.named_parameters(), OptimConfig(lr_mult={"vqa": 2.0, "classifier": 3.0}))


def test_all_frozen_is_an_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        param_groups(model.named_parameters(), OptimConfig())


def test_optim_config_validation():
    from vlkit.config import from_dict

    with pytest.raises(ConfigError, match="optim.accum_steps"):
        OptimConfig(accum_steps=0)
    with pytest.raises(ConfigError, match="no_decay"):
        from_dict(OptimConfig, {"no_decay": "lavis"})
