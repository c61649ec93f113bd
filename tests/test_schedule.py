import math

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_polynomial_decay_schedule_with_warmup

from vlkit.errors import ConfigError
from vlkit.training.recipe import ScheduleConfig
from vlkit.training.schedule import LrSchedule


def hf_lrs(factory, total: int, lr: float, **kwargs) -> list[float]:
    """The lr each optimiser step uses under a transformers LambdaLR schedule (stepped after each update)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = factory(opt, num_training_steps=total, **kwargs)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("warmup", [0, 7])
def test_cosine_matches_transformers(warmup):
    total, lr = 50, 3e-4
    ours = LrSchedule(ScheduleConfig(name="cosine", warmup_steps=warmup), base_lr=lr, total_steps=total)
    ref = hf_lrs(get_cosine_schedule_with_warmup, total, lr, num_warmup_steps=warmup)
    assert [ours.lr(s) for s in range(total)] == pytest.approx(ref, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("power, end_lr", [(1.0, 0.0), (2.0, 1e-6)])
def test_linear_matches_transformers_polynomial(power, end_lr):
    total, lr, warmup = 40, 1e-4, 4
    cfg = ScheduleConfig(name="linear", warmup_steps=warmup, min_lr=end_lr, power=power)
    ours = LrSchedule(cfg, base_lr=lr, total_steps=total)
    ref = hf_lrs(
        get_polynomial_decay_schedule_with_warmup, total, lr, num_warmup_steps=warmup, lr_end=end_lr, power=power
    )
    assert [ours.lr(s) for s in range(total)] == pytest.approx(ref, rel=1e-9, abs=1e-15)


def lavis_reference(epochs: int, iters: int, accum: int, init_lr: float, min_lr: float, warmup_lr: float, warmup: int):
    """LAVIS runner + LinearWarmupCosineLRScheduler written from blip2-spec §2.6: lr set before every
    micro-batch i (warmup in epoch 0 only, per-epoch cosine after), optimiser stepped every `accum`."""
    used = []
    for epoch in range(epochs):
        for i in range(iters):
            if epoch == 0:
                lr = min(init_lr, warmup_lr + (init_lr - warmup_lr) * i / max(warmup, 1))
            else:
                lr = min_lr + (init_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
            if (i + 1) % accum == 0:
                used.append(lr)
    return used


@pytest.mark.parametrize("accum, warmup", [(1, 5), (2, 5), (1, 100)])
def test_lavis_schedule(accum, warmup):
    epochs, iters = 4, 12
    cfg = ScheduleConfig(name="lavis", warmup_steps=warmup, warmup_lr=1e-6, min_lr=1e-5)
    spe = iters // accum
    ours = LrSchedule(
        cfg, base_lr=1e-4, total_steps=epochs * spe, steps_per_epoch=spe, epochs=epochs, accum_steps=accum
    )
    ref = lavis_reference(epochs, iters, accum, 1e-4, 1e-5, 1e-6, warmup)
    assert [ours.lr(s) for s in range(epochs * spe)] == pytest.approx(ref, rel=1e-12)
    # cosine is constant within an epoch (per-epoch, not per-step)
    assert ours.lr(spe) == ours.lr(2 * spe - 1)


def test_warmup_fraction_and_constant():
    sched = LrSchedule(ScheduleConfig(name="constant", warmup_fraction=0.1), base_lr=2.0, total_steps=95)
    assert sched.warmup_steps == 9  # int(0.1 * 95), as VLMo
    assert sched.lr(0) == 0.0 and sched.lr(9) == 2.0 and sched.lr(94) == 2.0
    assert sched.lr(3) == pytest.approx(2.0 * 3 / 9)


def test_schedule_config_errors():
    with pytest.raises(ConfigError, match="not both"):
        ScheduleConfig(warmup_steps=3, warmup_fraction=0.1)
    with pytest.raises(ConfigError, match="lavis needs"):
        LrSchedule(ScheduleConfig(name="lavis"), base_lr=1.0, total_steps=10)
    with pytest.raises(ConfigError, match="at least one"):
        LrSchedule(ScheduleConfig(), base_lr=1.0, total_steps=0)


def test_state_dict_reports_changes():
    a = LrSchedule(ScheduleConfig(warmup_steps=2), base_lr=1.0, total_steps=10)
    b = LrSchedule(ScheduleConfig(warmup_steps=2), base_lr=1.0, total_steps=20)
    assert a.check_resumable(a.state_dict(), source="x") == []
    assert b.check_resumable(a.state_dict(), source="x") == ["total_steps: 10 -> 20"]
