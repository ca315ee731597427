"""Each FullFinetuneSFT / engine option does what its config says."""

import pytest
import torch
from test_trainer import run, weights

SGD = ("method.optimizer._target_=torch.optim.SGD", "method.optimizer.lr=1.0", "method.optimizer.weight_decay=0",
       "method.lr_scheduler=null", "data.shuffle=false")  # fmt: skip


def lrs(out):
    import csv

    with (out / "metrics.csv").open() as f:
        return [float(r["train/lr"]) for r in csv.DictReader(f) if r.get("train/lr")]


def test_epoch_interval_scheduler_steps_once_per_epoch(tmp_path):
    run(tmp_path / "e", "method.max_epochs=3", "method.lr_scheduler_interval=epoch", "method.lr_scheduler.warmup_steps=0",
        "method.lr_scheduler.min_lr=0")  # fmt: skip
    seen = lrs(tmp_path / "e")
    assert len(seen) == 12
    # 4 steps per epoch share one rate; T_max is the number of epochs (3), so the rate decays per epoch
    assert seen[0:4] == [seen[0]] * 4 and seen[4:8] == [seen[4]] * 4 and seen[0] > seen[4] > seen[8]
    assert seen[0] == pytest.approx(1e-3)


def test_gradient_clipping_by_norm_and_by_value(tmp_path):
    # lm_head.weight is the tied embedding: count that parameter once
    # lr 1e-30: the untouched weights (a learning rate of 0 is refused as a mistake); the update is below float32 resolution
    base = weights(run(tmp_path / "b", *SGD, "method.max_steps=1", "method.optimizer.lr=1e-30").final_checkpoint)
    by_norm = weights(run(tmp_path / "n", *SGD, "method.max_steps=1", "method.gradient_clip_val=0.001").final_checkpoint)
    update = torch.cat([(by_norm[k] - base[k]).flatten() for k in base if k != "lm_head.weight"])
    assert update.norm().item() == pytest.approx(0.001, rel=1e-3)
    by_value = weights(run(tmp_path / "v", *SGD, "method.max_steps=1", "method.gradient_clip_val=1e-5",
                           "method.gradient_clip_algorithm=value").final_checkpoint)  # fmt: skip
    update = torch.cat([(by_value[k] - base[k]).flatten() for k in base if k != "lm_head.weight"])
    assert update.abs().max().item() == pytest.approx(1e-5, rel=1e-2)  # float32 differences of ~0.02 weights


def test_fixed_token_embedding_stays_put_and_save_full_model_false_keeps_only_trainable(tmp_path):
    start = weights(run(tmp_path / "s", "method.max_steps=1", "method.optimizer.lr=1e-30", "method.fix_token_embedding=true").final_checkpoint)
    trained = run(tmp_path / "t", "method.max_steps=2", "method.fix_token_embedding=true", "method.save_full_model=false",
                  "method.checkpoint_save_interval=step", "method.save_optimizer_state=true")  # fmt: skip
    saved = weights(trained.final_checkpoint)
    assert "model.embed_tokens.weight" not in saved  # frozen, so not in a trainable-only checkpoint
    assert any(not torch.equal(saved[k], start[k]) for k in saved)
    resumed = run(tmp_path / "r", "method.max_steps=2", "method.fix_token_embedding=true", "method.save_full_model=false",
                  f"method.ckpt_path={tmp_path / 't/checkpoints/step-000001'}", "method.checkpoint_save_interval=step",
                  "method.save_optimizer_state=true")  # fmt: skip
    again = weights(resumed.final_checkpoint)
    for key in saved:
        torch.testing.assert_close(again[key], saved[key], rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precisions_train(tmp_path, precision):
    result = run(tmp_path / precision, "method.max_steps=2", f"fabric.precision={precision}", "taskpool=heldout-loss",
                 "data.val_fraction=0.25")  # fmt: skip
    assert all(torch.isfinite(torch.tensor(v["val/loss"])) for v in result.evaluations.values())


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    plain = weights(run(tmp_path / "p", *SGD, "method.max_steps=1").final_checkpoint)
    recomputed = weights(run(tmp_path / "g", *SGD, "method.max_steps=1", "gradient_checkpointing=true").final_checkpoint)
    for key in plain:
        torch.testing.assert_close(recomputed[key], plain[key], rtol=1e-5, atol=1e-6)


def test_model_pool_loads_a_saved_hf_folder(tmp_path):
    from tunelab.errors import TunelabError

    first = run(tmp_path / "a", "method.max_steps=1", "method.save_ckpt_type=hf")
    again = run(tmp_path / "b", "method.max_steps=1", "modelpool.config=null",
                f"modelpool.model_path={first.final_checkpoint}", f"modelpool.tokenizer_path={first.final_checkpoint}")  # fmt: skip
    assert again.state.global_step == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunelabError, match="without config.json"):
        run(tmp_path / "c", "modelpool.config=null", f"modelpool.model_path={tmp_path / 'empty'}")
