"""Exact resume: 2N steps stopped at N (trainer.stop_at_step) and continued in new processes equal
2N uninterrupted steps: the same losses and final weights within 1e-6 (fp32, dropout on, so the
RNG states, data position, optimizer state and schedule must all come back)."""

import pytest
import torch

from conftest import run_on_ranks
from lm.checkpoint import find_latest_checkpoint, load_consolidated_state_dict, read_trainer_state
from lm.config import config_to_dict

N = 3
STAGES = (2, 3)


def run_stages(rank, cfg_dict, dataset_dir, root, run_name, stop_at_step):
    from lm.config import config_from_dict
    from lm.standalone import local_hooks
    from lm.trainer import train

    losses = {}
    for stage in STAGES:
        cfg = config_from_dict(cfg_dict)
        cfg.deepspeed.zero_stage = stage
        cfg.trainer.stop_at_step = stop_at_step
        logged = []
        hooks = local_hooks(f"{root}/zero{stage}-{run_name}", rank, keep=3,
                            log=lambda m, s: logged.append((s, m.get("train_loss"))))
        if stop_at_step:  # what a metrics logger keeps (its run id): the rerun's checkpoints still hold it
            hooks.resume_state = lambda: {"logger_run_id": f"{run_name}-{stage}"}
        train(cfg, dataset_dir, hooks)
        losses[stage] = {s: loss for s, loss in logged if loss is not None}
    return losses


def test_stop_at_n_then_rerun_equals_uninterrupted(tiny_train_config, prepared_tiny, tmp_path):
    prepared, vocab = prepared_tiny
    cfg = tiny_train_config(max_steps=2 * N, ckpt_every=100, eval_every=100)
    cfg.model.vocab_size, cfg.model.dropout, cfg.optim.warmup_steps = vocab, 0.1, 1
    args = (config_to_dict(cfg), str(prepared.directory), str(tmp_path))

    straight = run_on_ranks(run_stages, 2, *args, "straight", None, tmp_path=tmp_path)[0]
    first_half = run_on_ranks(run_stages, 2, *args, "resumed", N, tmp_path=tmp_path)[0]
    second_half = run_on_ranks(run_stages, 2, *args, "resumed", None, tmp_path=tmp_path)[0]

    for stage in STAGES:
        assert sorted(first_half[stage]) == list(range(1, N + 1)), "the first invocation stops at N"
        assert sorted(second_half[stage]) == list(range(N + 1, 2 * N + 1)), "the rerun continues at N+1"
        resumed = {**first_half[stage], **second_half[stage]}
        for step, loss in straight[stage].items():
            assert resumed[step] == pytest.approx(loss, abs=1e-6), f"ZeRO-{stage} step {step}"
        a = load_consolidated_state_dict(find_latest_checkpoint(tmp_path / f"zero{stage}-straight"))
        b = load_consolidated_state_dict(find_latest_checkpoint(tmp_path / f"zero{stage}-resumed"))
        kept = read_trainer_state(find_latest_checkpoint(tmp_path / f"zero{stage}-resumed"))["hooks"]
        assert kept == {"logger_run_id": f"resumed-{stage}"}
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=lambda m: f"ZeRO-{stage} {name}: {m}")


def stop_on_rank_one(rank, cfg_dict, dataset_dir, root):
    from lm.config import config_from_dict
    from lm.standalone import local_hooks
    from lm.trainer import train

    cfg = config_from_dict(cfg_dict)
    hooks = local_hooks(f"{root}/stopped", rank, keep=3)
    asked = iter([False, False, True] if rank == 1 else [])
    hooks.stop_requested = lambda: next(asked, rank == 1)
    metrics = train(cfg, dataset_dir, hooks)
    return metrics["steps"], metrics.get("stopped_early")


def test_a_stop_request_on_one_rank_checkpoints_every_rank_at_that_log_step(tiny_train_config, prepared_tiny,
                                                                            tmp_path):
    prepared, vocab = prepared_tiny
    cfg = tiny_train_config(max_steps=10, ckpt_every=100, eval_every=100, log_every=2)
    cfg.model.vocab_size = vocab
    results = run_on_ranks(stop_on_rank_one, 2, config_to_dict(cfg), str(prepared.directory), str(tmp_path),
                           tmp_path=tmp_path)
    assert results == [(6, True), (6, True)]  # the third log step is step 6
    assert find_latest_checkpoint(tmp_path / "stopped").name == "checkpoint_000006"


def run_mixture(rank, cfg_dict, dataset_dir, root, runs):
    from lm.config import config_from_dict
    from lm.standalone import local_hooks
    from lm.trainer import train

    losses = {}
    for name, stop_at_step in runs:
        cfg = config_from_dict(cfg_dict)
        cfg.trainer.stop_at_step = stop_at_step
        logged = {}
        final = train(cfg, dataset_dir, local_hooks(f"{root}/{name}", rank, keep=3,
                                                    log=lambda m, s: logged.update({s: m["train_loss"]} if "train_loss" in m else {})))
        losses[name] = logged
        losses[f"{name}-val"] = {k: v for k, v in final.items() if k.startswith("val_loss")}
    return losses


def test_a_data_mixture_resumes_exactly(tiny_train_config, tmp_path, corpus_file):
    from lm.config import padded_vocab_size
    from lm.data import prepare_data

    cfg = tiny_train_config(max_steps=2 * N, ckpt_every=100, eval_every=100)
    cfg.data.path, cfg.data.weights = f"{corpus_file},{corpus_file}", [3.0, 1.0]  # two sources (the same text)
    prepared = prepare_data(cfg.data, progress=False)
    assert len(prepared.meta["sources"]) == 2
    cfg.model.vocab_size = padded_vocab_size(prepared.meta["vocab_size"])
    args = (config_to_dict(cfg), str(prepared.directory), str(tmp_path))
    first = run_on_ranks(run_mixture, 2, *args, [("straight", None), ("resumed", N)], tmp_path=tmp_path)[0]
    second = run_on_ranks(run_mixture, 2, *args, [("resumed", None)], tmp_path=tmp_path)[0]
    resumed = {**first["resumed"], **second["resumed"]}
    assert sorted(resumed) == sorted(first["straight"]) == list(range(1, 2 * N + 1))
    for step, loss in first["straight"].items():
        assert resumed[step] == pytest.approx(loss, abs=1e-6), step
    val = first["straight-val"]
    assert sorted(val) == ["val_loss", "val_loss/0-corpus.txt", "val_loss/1-corpus.txt"], "each source's own val loss"
    assert min(val["val_loss/0-corpus.txt"], val["val_loss/1-corpus.txt"]) <= val["val_loss"] <= \
        max(val["val_loss/0-corpus.txt"], val["val_loss/1-corpus.txt"]), "the mixture's: between its sources'"
    assert second["resumed-val"] == pytest.approx(val, abs=1e-6)
