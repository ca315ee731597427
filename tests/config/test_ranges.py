"""Options with a meaningful range are refused before any model loads, under the key the user set."""

import pytest

from tunelab.config import compose_config, list_groups, validate_config
from tunelab.errors import TunelabError


@pytest.mark.parametrize(
    "override, key, must",
    [
        ("method.optimizer.lr=-1e-5", "method.optimizer.lr", "positive"),
        ("method.optimizer.lr=0", "method.optimizer.lr", "positive"),
        ("method.dataloader_kwargs.batch_size=0", "method.dataloader_kwargs.batch_size", "positive"),
        ("method.max_length=-5", "method.max_length", "positive"),
        ("method.gradient_clip_val=-1.0", "method.gradient_clip_val", "positive"),
        ("method.accumulate_grad_batches=0", "method.accumulate_grad_batches", "positive"),
        ("method.max_steps=-2", "method.max_steps", "-1 for no limit"),
        ("method.lr_scheduler.warmup_steps=-10", "method.lr_scheduler.warmup_steps", "0 or more"),
        ("method.optimizer.weight_decay=-0.1", "method.optimizer.weight_decay", "0 or more"),
        ("data.val_fraction=1.0", "data.val_fraction", "below 1"),
        ("data.val_fraction=-0.1", "data.val_fraction", "at least 0"),
        ("taskpool=heldout-loss taskpool.every_n_steps=-1", "taskpool.every_n_steps", "0 or more"),
    ],
)
def test_out_of_range_values_name_their_key(override, key, must):
    with pytest.raises(TunelabError) as err:
        validate_config(compose_config(override.split()))
    assert f"'{key}'" in str(err.value) and must in str(err.value)


def test_a_bad_learning_rate_is_reported_where_it_was_set_not_where_it_is_interpolated():
    # lr_scheduler.max_lr is ${method.optimizer.lr}: the message must name optimizer.lr
    with pytest.raises(TunelabError, match=r"'method\.optimizer\.lr'") as err:
        validate_config(compose_config(["method.optimizer.lr=-3e-4"]))
    assert "max_lr" not in str(err.value)
    with pytest.raises(TunelabError, match=r"'method\.lr_scheduler\.max_lr'"):
        validate_config(compose_config(["method.lr_scheduler.max_lr=-1.0"]))


def test_ranges_in_the_other_methods():
    with pytest.raises(TunelabError, match="'method.top_p'.*above 0 and at most 1"):
        validate_config(compose_config(["method=lm_finetune/grpo", "method.top_p=1.5"]))
    with pytest.raises(TunelabError, match="'method.num_generations'.*positive"):
        validate_config(compose_config(["method=lm_finetune/grpo", "method.num_generations=0"]))
    with pytest.raises(TunelabError, match="'method.lam'.*between 0 and 1"):
        validate_config(compose_config(["method=lm_finetune/ppo", "method.lam=1.5"]))
    with pytest.raises(TunelabError, match="'method.peft_config.r'.*positive"):
        validate_config(compose_config(["method=lm_finetune/peftfinetune_sft", "method.peft_config.r=0"]))


def test_every_shipped_combination_is_in_range():
    groups = list_groups()
    for method in groups["method"]:
        for taskpool in groups["taskpool"]:
            validate_config(compose_config([f"method={method}", f"taskpool={taskpool}"]))


@pytest.mark.parametrize(
    "override, key",
    [  # each found by tests/fuzz/test_fuzz_inputs.py, accepted before
        ("fabric.devices=not-a-number", "fabric.devices"),
        ("method.dataloader_kwargs.batch_size=not-a-number", "method.dataloader_kwargs.batch_size"),
        ("method.dataloader_kwargs.num_workers=[1,2]", "method.dataloader_kwargs.num_workers"),
        ("method.dataloader_kwargs.pin_memory=maybe", "method.dataloader_kwargs.pin_memory"),
        ("method.optimizer.lr=inf", "method.optimizer.lr"),
        ("method.optimizer.lr=nan", "method.optimizer.lr"),
    ],
)
def test_values_the_fuzz_test_found_accepted(override, key):
    with pytest.raises(TunelabError, match=f"'{key}'"):
        validate_config(compose_config([override]))


@pytest.mark.parametrize("devices", ["1", "auto", "-1", "'0,1'", "[0,1]"])
def test_device_choices_that_mean_something_are_accepted(devices):
    validate_config(compose_config([f"fabric.devices={devices}"]))
