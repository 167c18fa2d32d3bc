"""Every precision / ZeRO / memory option a user can pick trains and leaves a loadable checkpoint:
bf16 on ZeRO 0/2/3, ZeRO-3 with optimizer and parameter offload, activation checkpointing."""

import math

from conftest import run_on_ranks
from lm.config import config_to_dict

PATHS = {  # name: (precision, zero stage, offload, activation checkpointing)
    "bf16-zero0": ("bf16", 0, False, False),
    "bf16-zero2": ("bf16", 2, False, False),
    "bf16-zero3": ("bf16", 3, False, False),
    "zero3-offload": ("fp32", 3, True, False),
    "activation-checkpointing": ("fp32", 2, False, True),
}


def train_each_path(rank, cfg_dict, dataset_dir, root):
    from lm.checkpoint import find_latest_checkpoint, load_model
    from lm.config import config_from_dict
    from lm.standalone import local_hooks
    from lm.trainer import train

    results = {}
    for name, (precision, stage, offload, checkpointing) in PATHS.items():
        cfg = config_from_dict(cfg_dict)
        cfg.trainer.precision, cfg.deepspeed.zero_stage = precision, stage
        cfg.deepspeed.offload_optimizer = cfg.deepspeed.offload_params = offload
        cfg.model.activation_checkpointing = checkpointing
        metrics = train(cfg, dataset_dir, local_hooks(f"{root}/{name}", rank, keep=1, log=lambda m, s: None))
        model, _, _ = load_model(find_latest_checkpoint(f"{root}/{name}"))
        results[name] = (metrics["train_loss"], metrics["val_loss"], model.num_params())
    return results


def test_every_precision_and_memory_option_trains_and_checkpoints(tiny_train_config, prepared_tiny, tmp_path):
    prepared, vocab = prepared_tiny
    cfg = tiny_train_config(max_steps=4, ckpt_every=4, eval_every=4)
    cfg.model.vocab_size, cfg.cluster.num_workers = vocab, 1
    results = run_on_ranks(train_each_path, 1, config_to_dict(cfg), str(prepared.directory), str(tmp_path),
                           tmp_path=tmp_path)[0]
    assert set(results) == set(PATHS)
    sizes = {n for _, _, n in results.values()}
    assert len(sizes) == 1, "every path restores the whole model"
    for name, (train_loss, val_loss, _) in results.items():
        assert math.isfinite(train_loss) and math.isfinite(val_loss), name
        assert abs(val_loss - math.log(512)) < 1.0, f"{name}: a 4-step model is near uniform over 512 tokens"
