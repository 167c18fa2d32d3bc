"""Every precision / ZeRO / memory option a user can pick trains and leaves a loadable checkpoint:
bf16 on ZeRO 0/2/3, fp16 on ZeRO 0/2 (DeepSpeed's fp16 machinery run on CPU tensors), ZeRO-3 with
optimizer and parameter offload, activation checkpointing, `trainer.precision=auto` decided the
same way on every rank, and `trainer.compile`."""

import json
import math
import sys

import torch
from conftest import run_on_ranks
from lm.config import config_to_dict
from lm.mfu import native_bf16

PATHS = {  # name: (precision, zero stage, offload, activation checkpointing)
    "bf16-zero0": ("bf16", 0, False, False),
    "bf16-zero2": ("bf16", 2, False, False),
    "bf16-zero3": ("bf16", 3, False, False),
    "fp16-zero0": ("fp16", 0, False, False),
    "fp16-zero2": ("fp16", 2, False, False),
    "zero3-offload": ("fp32", 3, True, False),
    "activation-checkpointing": ("fp32", 2, False, True),
    "auto-zero0": ("auto", 0, False, False),
}


def train_each_path(rank, cfg_dict, dataset_dir, root):
    from deepspeed.accelerator import get_accelerator

    from lm.checkpoint import find_latest_checkpoint, load_model
    from lm.config import config_from_dict
    from lm.standalone import local_hooks
    from lm.trainer import train

    # fp16 is for GPUs (the launcher refuses it on CPU workers) and DeepSpeed refuses it on a CPU
    # accelerator; here its loss scaling, overflow skips and checkpoints run on CPU tensors all the same.
    get_accelerator().is_fp16_supported = lambda: True
    results = {}
    for name, (precision, stage, offload, checkpointing) in PATHS.items():
        cfg = config_from_dict(cfg_dict)
        cfg.trainer.precision, cfg.deepspeed.zero_stage = precision, stage
        cfg.deepspeed.offload_optimizer = cfg.deepspeed.offload_params = offload
        cfg.model.activation_checkpointing = checkpointing
        logged = []
        hooks, started = local_hooks(f"{root}/{name}", rank, keep=1, log=lambda m, s: logged.append(m)), []
        hooks.started = started.append
        metrics = train(cfg, dataset_dir, hooks)
        checkpoint = find_latest_checkpoint(f"{root}/{name}")
        model, _, saved = load_model(checkpoint)
        results[name] = (metrics["train_loss"], metrics["val_loss"], model.num_params(), metrics["precision"],
                         saved.trainer.precision, [c["trainer"]["precision"] for c in started],
                         [(m["loss_scale"], m["skipped_steps"]) for m in logged if "loss_scale" in m])
    from lm.trainer import MUON_MODULE

    muon = sys.modules.get(MUON_MODULE)
    return results, {"inductor imported": "torch._inductor.compile_fx" in sys.modules,
                     "Muon's module": muon.__name__ if muon else None}


def test_every_precision_and_memory_option_trains_and_checkpoints(tiny_train_config, prepared_tiny, tmp_path):
    prepared, vocab = prepared_tiny
    cfg = tiny_train_config(max_steps=4, ckpt_every=4, eval_every=4)
    cfg.model.vocab_size, cfg.cluster.num_workers = vocab, 1
    results, imports = run_on_ranks(train_each_path, 1, config_to_dict(cfg), str(prepared.directory), str(tmp_path),
                                    tmp_path=tmp_path)[0]
    # DeepSpeed imports its Muon optimizer in every path; it must not bring in torch.compile's inductor
    # with it (1.2-1.8 s a rank at every start: lm.trainer.import_muon_without_compiling).
    assert imports == {"inductor imported": False, "Muon's module": "deepspeed.runtime.zero.muon.muon_optimizer"}
    assert set(results) == set(PATHS)
    sizes = {r[2] for r in results.values()}
    assert len(sizes) == 1, "every path restores the whole model"
    for name, (train_loss, val_loss, _, precision, saved_precision, started, scaling) in results.items():
        assert math.isfinite(train_loss) and math.isfinite(val_loss), name
        assert abs(val_loss - math.log(512)) < 1.0, f"{name}: a 4-step model is near uniform over 512 tokens"
        expected = PATHS[name][0] if PATHS[name][0] != "auto" else ("bf16" if native_bf16(torch.device("cpu")) else "fp32")
        assert precision == saved_precision == expected, f"{name}: ran in and recorded the precision it resolved to"
        assert started == [expected], f"{name}: the start hook saw the resolved config once (W&B's config)"
        if precision == "fp16":  # logged at every log step: a power of two at most the initial 2^16
            assert len(scaling) == 4, name
            assert all(1 <= s <= 2**16 and math.log2(s).is_integer() and k >= 0 for s, k in scaling), name
        else:
            assert scaling == [], f"{name}: only fp16 has a loss scale"


CASES = (([True, True], "bf16"), ([True, False], "fp32"), ([False, False], "fp32"))  # (bf16 per rank, auto)


def resolve_each_case(rank, cfg_dict, resume_from):
    from lm import trainer
    from lm.config import config_from_dict

    trainer.init_distributed()
    cfg, cpu, resolved = config_from_dict(cfg_dict), torch.device("cpu"), []
    for has_bf16, _ in CASES:
        trainer.native_bf16 = lambda device: has_bf16[rank]
        resolved.append((trainer.resolve_precision(cfg, cpu, None), trainer.resolve_precision(cfg, cpu, resume_from)))
    torch.distributed.destroy_process_group()  # a rank leaving mid-collective would abort its peer
    return resolved


def test_auto_precision_is_bf16_only_where_every_rank_has_it_and_a_resume_keeps_its_checkpoints(tiny_train_config, tmp_path):
    cfg = tiny_train_config()
    cfg.trainer.precision, cfg.cluster.num_workers = "auto", 2
    resumed = tmp_path / "checkpoint_000010"
    resumed.mkdir()
    saved = config_to_dict(cfg)
    saved["trainer"]["precision"] = "fp32"  # what an earlier auto run resolved to
    (resumed / "config.json").write_text(json.dumps(saved))
    results = run_on_ranks(resolve_each_case, 2, config_to_dict(cfg), str(resumed), tmp_path=tmp_path)
    assert results == [[(fresh, "fp32") for _, fresh in CASES]] * 2


def train_eager_and_compiled(rank, cfg_dict, dataset_dir, root):
    import torch._dynamo

    from lm.checkpoint import find_latest_checkpoint, load_model
    from lm.config import config_from_dict
    from lm.standalone import local_hooks
    from lm.trainer import train

    results = {}
    for name, compile in (("eager", False), ("compiled", True)):
        cfg = config_from_dict(cfg_dict)
        cfg.trainer.compile = compile
        torch._dynamo.utils.counters.clear()
        metrics = train(cfg, dataset_dir, local_hooks(f"{root}/{name}", rank, keep=1, log=lambda m, s: None))
        model, _, _ = load_model(find_latest_checkpoint(f"{root}/{name}"))
        results[name] = (metrics["train_loss"], metrics["val_loss"], model.state_dict(),
                         sum(torch._dynamo.utils.counters["stats"].values()))
    cfg.trainer.max_steps = 6  # the eager run, resumed with compile on
    hooks = local_hooks(f"{root}/eager", rank, keep=1, log=lambda m, s: None)
    results["resumed"] = (hooks.resume_from, train(cfg, dataset_dir, hooks)["steps"])
    return results


def test_a_compiled_model_trains_as_the_eager_one_checkpoints_the_same_weights_and_resumes(tiny_train_config, prepared_tiny,
                                                                                  tmp_path):
    prepared, vocab = prepared_tiny
    cfg = tiny_train_config(max_steps=4, ckpt_every=4, eval_every=4)
    cfg.model.vocab_size, cfg.cluster.num_workers, cfg.deepspeed.zero_stage = vocab, 1, 2
    results = run_on_ranks(train_eager_and_compiled, 1, config_to_dict(cfg), str(prepared.directory), str(tmp_path),
                           tmp_path=tmp_path)[0]
    (eager_loss, eager_val, eager_weights, eager_frames), (loss, val, weights, frames) = results["eager"], results["compiled"]
    assert eager_frames == 0 and frames > 0, "only trainer.compile=true runs the model through torch.compile"
    assert math.isclose(loss, eager_loss, rel_tol=1e-4) and math.isclose(val, eager_val, rel_tol=1e-4)
    assert weights.keys() == eager_weights.keys(), "the checkpoint keeps the model's own parameter names"
    for key, value in weights.items():
        torch.testing.assert_close(value, eager_weights[key], rtol=1e-4, atol=1e-5, msg=key)
    resumed_from, steps = results["resumed"]
    assert resumed_from.endswith("checkpoint_000004") and steps == 6, "an eager run resumes with compile on"
