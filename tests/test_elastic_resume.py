"""A run resumes on another number of workers: DeepSpeed's partitioned ZeRO state is resharded through
its universal checkpoint format, and with the global batch kept (micro batch x workers), training
continues exactly as the uninterrupted run would have (ZeRO-2, ZeRO-3, and ZeRO-3 with CPU offload)."""

import hashlib
import math

from conftest import run_on_ranks
from lm.config import config_to_dict

# run: (ZeRO stage, CPU offload of the optimizer and, at ZeRO-3, the parameters)
RUNS = {"straight-z2": (2, False), "shrink-z2": (2, False), "straight-z3": (3, False), "shrink-z3": (3, False),
        "expand-z3": (3, False), "straight-z3-offload": (3, True), "shrink-z3-offload": (3, True)}


def train_phase(rank, cfg_dict, dataset_dir, root, phases):
    from lm.config import config_from_dict
    from lm.standalone import local_hooks
    from lm.trainer import train

    results = {}
    for run, stop in phases:
        cfg = config_from_dict(cfg_dict)
        (cfg.deepspeed.zero_stage, offload), cfg.trainer.stop_at_step = RUNS[run], stop
        cfg.deepspeed.offload_optimizer = cfg.deepspeed.offload_params = offload
        losses = {}
        hooks = local_hooks(f"{root}/{run}", rank, keep=2,
                            log=lambda m, s: losses.update({s: m["train_loss"]} if "train_loss" in m else {}))
        val = train(cfg, dataset_dir, hooks)["val_loss"]
        results[run] = (losses, val)
    return results


def digest(directory) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(directory)).encode() + p.read_bytes())
    return h.hexdigest()


def test_resume_on_another_number_of_workers_continues_the_uninterrupted_run(tiny_train_config, prepared_tiny,
                                                                           tmp_path):
    prepared, vocab = prepared_tiny
    on = {}
    for workers in (1, 2):  # the same global batch: 4 sequences a micro step
        cfg = tiny_train_config(max_steps=8, ckpt_every=4, eval_every=8, micro_batch_size=4 // workers)
        cfg.model.vocab_size, cfg.cluster.num_workers = vocab, workers
        on[workers] = config_to_dict(cfg)
    data = str(prepared.directory)

    two = run_on_ranks(train_phase, 2, on[2], data, str(tmp_path),
                       [("straight-z2", None), ("shrink-z2", 4), ("straight-z3", None), ("shrink-z3", 4),
                        ("straight-z3-offload", None), ("shrink-z3-offload", 4)], tmp_path=tmp_path)[0]
    saved = tmp_path / "shrink-z3" / "checkpoint_000004" / "deepspeed" / "state"
    before = digest(saved)
    one = run_on_ranks(train_phase, 1, on[1], data, str(tmp_path),
                       [("shrink-z2", None), ("shrink-z3", None), ("shrink-z3-offload", None), ("expand-z3", 4)],
                       tmp_path=tmp_path)[0]
    expanded = run_on_ranks(train_phase, 2, on[2], data, str(tmp_path), [("expand-z3", None)], tmp_path=tmp_path)[0]

    for straight, (resumed, where) in (("straight-z2", ("shrink-z2", one)), ("straight-z3", ("shrink-z3", one)),
                                       ("straight-z3", ("expand-z3", expanded)),
                                       ("straight-z3-offload", ("shrink-z3-offload", one))):
        losses, val = two[straight]
        resumed_losses, resumed_val = where[resumed]
        assert sorted(resumed_losses) == [5, 6, 7, 8], "the resumed part starts where the checkpoint was"
        for step, loss in resumed_losses.items():
            assert math.isclose(loss, losses[step], rel_tol=1e-6), (resumed, step, loss, losses[step])
        assert math.isclose(resumed_val, val, rel_tol=1e-6), (resumed, resumed_val, val)

    universal = saved.parent / "state_universal"
    assert (universal / "zero").is_dir(), "the universal form is written beside the original"
    assert digest(saved) == before, "and the original is left as it was"
    assert sorted(p.name for p in saved.parent.iterdir() if p.name.startswith(("state", ".state", "latest"))) == \
        ["state", "state_universal"], "no staging directory or `latest` file is left behind"
    assert not (tmp_path / "straight-z2" / "checkpoint_000004" / "deepspeed" / "state_universal").exists()
