"""The shipped Hydra config tree: composition, validation, placeholders and interpolation."""

import pytest
import torch
from omegaconf import OmegaConf

from tunelab.config import CONFIG_DIR, compose_config, instantiate, list_groups, replace_placeholder, validate_config
from tunelab.errors import TunelabError
from tunelab.optim import CosineDecayWithWarmup


def _error(overrides: list[str]) -> str:
    """The message of the TunelabError that composing or validating ``overrides`` raises."""
    with pytest.raises(TunelabError) as info:
        validate_config(compose_config(overrides))
    return str(info.value)


def test_list_groups_matches_the_yaml_tree():
    groups = list_groups()
    assert set(groups) == {"method", "modelpool", "data", "taskpool", "fabric"}
    assert "lm_finetune/fullfinetune_sft" in groups["method"]
    assert {"CausalLMPool/smollm2-135m", "CausalLMPool/tiny-llama"} <= set(groups["modelpool"])
    assert {"default", "gsm8k-demo"} <= set(groups["data"])
    assert {"dummy", "heldout-loss"} <= set(groups["taskpool"])
    assert {"auto", "cpu"} <= set(groups["fabric"])
    for group, options in groups.items():
        for option in options:
            assert (CONFIG_DIR / group / f"{option}.yaml").is_file()


ALL_OPTIONS = [(group, option) for group, options in list_groups().items() for option in options]


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_shipped_option_composes_and_validates(group, option):
    cfg = compose_config([f"{group}={option}"])
    validate_config(cfg)
    node = cfg[group]
    assert node is not None
    if group != "data":
        assert "_target_" in node


def test_default_config_validates():
    cfg = compose_config([])
    validate_config(cfg)
    assert cfg.method._target_ == "tunelab.methods.FullFinetuneSFT"
    assert cfg.data.format == "prompt_completion"
    assert cfg.output_dir == "runs/default"


def test_option_values_reach_the_config():
    cfg = compose_config(["fabric=cpu", "data=gsm8k-demo", "modelpool=CausalLMPool/tiny-llama"])
    assert cfg.fabric.accelerator == "cpu"
    assert cfg.fabric.precision == "auto"  # inherited from fabric/auto
    assert cfg.data.prompt_field == "question"
    assert cfg.data.shuffle is True  # inherited from data/default
    assert cfg.modelpool.config.num_hidden_layers == 2


def test_unknown_method_key():
    message = _error(["method.lrr=1"])
    assert "'method.lrr'" in message
    # The valid keys of the section are listed, the nearest ones among them.
    assert "lr_scheduler" in message
    assert "max_epochs" in message


def test_unknown_key_suggests_close_spelling():
    message = _error(["method.max_epoch=1"])
    assert "'method.max_epoch'" in message
    assert "Did you mean 'method.max_epochs'" in message

    message = _error(["data.formt=text"])
    assert "'data.formt'" in message
    assert "'data.format'" in message


def test_misspelt_key_inside_target_node_on_the_command_line():
    message = _error(["method.optimizer.lrr=1"])
    assert "'method.optimizer.lrr'" in message
    assert "'method.optimizer.lr'" in message


def test_misspelt_key_inside_target_node_added_with_plus():
    # '+key=value' gets past Hydra; the signature check of torch.optim.AdamW catches it.
    message = _error(["+method.optimizer.lrr=1"])
    assert "'method.optimizer.lrr'" in message
    assert "Did you mean 'method.optimizer.lr'" in message
    assert "AdamW" in message


def test_misspelt_key_inside_target_node_in_the_tree():
    cfg = compose_config([])
    cfg.method.lr_scheduler.warmup_step = 10
    with pytest.raises(TunelabError) as info:
        validate_config(cfg)
    assert "'method.lr_scheduler.warmup_step'" in str(info.value)
    assert "'method.lr_scheduler.warmup_steps'" in str(info.value)


def test_unknown_top_level_key_in_the_tree():
    cfg = compose_config([])
    cfg.ouptut_dir = "x"
    with pytest.raises(TunelabError, match=r"'ouptut_dir'.*Did you mean 'output_dir'"):
        validate_config(cfg)


def test_wrong_type_names_the_key():
    message = _error(["method.max_epochs=abc"])
    assert "'method.max_epochs'" in message
    assert "'abc'" in message
    assert "int" in message


def test_bad_literal_names_the_key_and_choices():
    message = _error(["method.save_ckpt_type=foo"])
    assert "'method.save_ckpt_type'" in message
    assert "'foo'" in message
    assert "'lightning'" in message and "'hf'" in message

    message = _error(["data.overlong=cut"])
    assert "'data.overlong'" in message and "'truncate'" in message


def test_wrong_type_in_data_section():
    message = _error(["data.val_fraction=lots"])
    assert "'data.val_fraction'" in message


def test_bad_target_names_the_key():
    message = _error(["method.optimizer._target_=torch.optim.AdamWW"])
    assert "'method.optimizer._target_'" in message
    assert "torch.optim.AdamWW" in message


def test_unknown_group_option_lists_the_shipped_ones():
    with pytest.raises(TunelabError) as info:
        compose_config(["modelpool=CausalLMPool/nope"])
    message = str(info.value)
    assert "CausalLMPool/nope" in message
    assert "tiny-llama" in message


def test_t_max_placeholder_is_accepted():
    cfg = compose_config([])
    assert cfg.method.lr_scheduler.T_max == "_T_max_"
    validate_config(cfg)  # T_max is an int parameter, but the placeholder is filled at run time


def test_other_strings_for_int_parameters_are_rejected():
    cfg = compose_config([])
    cfg.method.lr_scheduler.T_max = "many"
    with pytest.raises(TunelabError, match=r"'method\.lr_scheduler\.T_max'"):
        validate_config(cfg)


def test_max_lr_follows_optimizer_lr():
    cfg = compose_config(["method.optimizer.lr=3e-4"])
    validate_config(cfg)
    assert cfg.method.lr_scheduler.max_lr == pytest.approx(3e-4)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["method"]["lr_scheduler"]["max_lr"] == pytest.approx(3e-4)
    assert compose_config([]).method.lr_scheduler.max_lr == pytest.approx(1e-5)


def test_replace_placeholder():
    cfg = compose_config(["method.optimizer.lr=3e-4"])
    node = replace_placeholder(cfg.method.lr_scheduler, "_T_max_", 123)
    assert isinstance(node, dict)
    assert node["T_max"] == 123
    assert node["max_lr"] == pytest.approx(3e-4)  # interpolations resolved on the way
    assert node["_target_"] == "tunelab.optim.lr_scheduler.CosineDecayWithWarmup"
    assert cfg.method.lr_scheduler.T_max == "_T_max_"  # the config itself is untouched

    nested = replace_placeholder({"a": ["_X_", {"b": "_X_"}], "c": "_X_y", "d": 1}, "_X_", 5)
    assert nested == {"a": [5, {"b": 5}], "c": "_X_y", "d": 1}


def test_instantiate_the_shipped_scheduler():
    cfg = compose_config(["method.optimizer.lr=3e-4", "method.lr_scheduler.warmup_steps=2"])
    optimizer = instantiate(cfg.method.optimizer, params=[torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.AdamW)
    scheduler = instantiate(replace_placeholder(cfg.method.lr_scheduler, "_T_max_", 10), optimizer=optimizer)
    assert isinstance(scheduler, CosineDecayWithWarmup)
    assert scheduler.T_max == 10
    assert scheduler.max_lr == pytest.approx(3e-4)
    assert scheduler.lr_at(2) == pytest.approx(3e-4)


def test_instantiate_the_shipped_method():
    cfg = compose_config(["method.max_epochs=2"])
    method = instantiate(cfg.method)
    assert type(method).__name__ == "FullFinetuneSFT"
    assert method.max_epochs == 2
    # Nested _target_ nodes stay plain dicts, built later with runtime arguments.
    assert method.optimizer["_target_"] == "torch.optim.AdamW"
    assert method.lr_scheduler["T_max"] == "_T_max_"
