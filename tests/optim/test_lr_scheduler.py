"""CosineDecayWithWarmup: linear warmup, cosine decay, floor, state round trip."""

import math

import pytest
import torch

from tunelab.optim import CosineDecayWithWarmup


def _optimizer(groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(groups)]
    return torch.optim.SGD(params, lr=123.0)


def _schedule(steps: int, **kwargs) -> list[float]:
    """The learning rate in force at steps 0..steps-1."""
    optimizer = _optimizer()
    scheduler = CosineDecayWithWarmup(optimizer, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_construction_sets_the_step_zero_rate():
    optimizer = _optimizer()
    CosineDecayWithWarmup(optimizer, T_max=10, init_lr=1e-4, warmup_steps=5, max_lr=1e-3, min_lr=1e-5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # the 123.0 it was built with is replaced


def test_warmup_is_linear_from_init_to_max():
    lrs = _schedule(6, T_max=20, init_lr=0.0, warmup_steps=4, max_lr=1.0, min_lr=0.1)
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert lrs[5] < 1.0


def test_warmup_with_nonzero_init_lr():
    lrs = _schedule(3, T_max=10, init_lr=0.2, warmup_steps=2, max_lr=1.0, min_lr=0.0)
    assert lrs == pytest.approx([0.2, 0.6, 1.0])


def test_reaches_min_lr_at_t_max_and_stays():
    lrs = _schedule(15, T_max=10, init_lr=0.0, warmup_steps=2, max_lr=1.0, min_lr=0.1)
    assert lrs[9] > 0.1
    assert lrs[10] == pytest.approx(0.1)
    assert lrs[10:] == pytest.approx([0.1] * 5)
    decay = lrs[2:11]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing after warmup


def test_cosine_midpoint():
    scheduler = CosineDecayWithWarmup(_optimizer(), T_max=110, warmup_steps=10, max_lr=1.0, min_lr=0.2)
    assert scheduler.lr_at(60) == pytest.approx(0.6)  # halfway through the decay: the mean of max and min
    quarter = 0.2 + 0.5 * 0.8 * (1 + math.cos(math.pi * 0.25))
    assert scheduler.lr_at(35) == pytest.approx(quarter)


def test_no_warmup_starts_at_max_lr():
    lrs = _schedule(2, T_max=4, warmup_steps=0, max_lr=0.5, min_lr=0.0)
    assert lrs[0] == pytest.approx(0.5)


def test_every_param_group_gets_the_same_rate():
    optimizer = _optimizer(groups=3)
    scheduler = CosineDecayWithWarmup(optimizer, T_max=10, warmup_steps=4, max_lr=1.0)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.75] * 3)


def test_t_max_must_be_positive():
    with pytest.raises(ValueError, match="T_max"):
        CosineDecayWithWarmup(_optimizer(), T_max=0)


def test_state_dict_round_trip():
    kwargs = dict(T_max=30, init_lr=0.0, warmup_steps=5, max_lr=1e-3, min_lr=1e-5)
    optimizer = _optimizer()
    scheduler = CosineDecayWithWarmup(optimizer, **kwargs)
    for _ in range(12):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    assert state["last_epoch"] == 12
    assert "optimizer" not in state

    # A fresh scheduler built with other values takes over the saved position and settings.
    restored_optimizer = _optimizer()
    restored = CosineDecayWithWarmup(restored_optimizer, T_max=99, warmup_steps=0, max_lr=5.0, min_lr=0.0)
    restored.load_state_dict(state)
    assert restored.last_epoch == 12
    assert (restored.T_max, restored.warmup_steps, restored.max_lr) == (30, 5, 1e-3)

    for _ in range(5):
        optimizer.step()
        scheduler.step()
        restored_optimizer.step()
        restored.step()
        assert restored_optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
        assert restored.get_last_lr() == pytest.approx(scheduler.get_last_lr())
