"""The DeepSpeed config dict, derived from the typed config so no number is typed twice."""

from __future__ import annotations

from lm.config import TrainConfig, global_batch_size


def trainer_clips_gradients(cfg: TrainConfig) -> bool:
    """ZeRO-0 in fp32: the trainer clips (torch's foreach clip_grad_norm_) instead of DeepSpeed, whose
    clip loops over parameters and all-reduces a norm that ZeRO-0's already averaged gradients
    make identical on every rank. Other stages and bf16 clip inside DeepSpeed's optimizer wrappers."""
    return cfg.deepspeed.zero_stage == 0 and cfg.trainer.precision == "fp32"


def deepspeed_config(cfg: TrainConfig) -> dict:
    ds, t = cfg.deepspeed, cfg.trainer
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=ds.overlap_comm, contiguous_gradients=True,
                    reduce_bucket_size=ds.reduce_bucket_size)
    if ds.zero_stage in (1, 2):
        zero.update(allgather_bucket_size=ds.allgather_bucket_size, reduce_scatter=True)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.cluster.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.cluster.use_gpu}
    return {
        "train_batch_size": global_batch_size(cfg),
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": 0.0 if trainer_clips_gradients(cfg) else cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        # Dynamic loss scaling from 2^16, halved on an overflow (that step is skipped), doubled after
        # 1,000 clean steps: DeepSpeed's documented defaults.
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        # Our client optimizer is torch's AdamW: DeepSpeed's fused/CPU Adam would JIT-compile
        # (~47 s on CPU) and offload would otherwise insist on DeepSpeedCPUAdam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed's own step prints add noise
        "wall_clock_breakdown": False,
    }
