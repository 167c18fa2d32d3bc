"""`trainer.profile_at`: every rank writes a trace of the window's steps and an operator table,
training is the same with it as without, and a run stopped inside the window writes no partial trace."""

import json
from pathlib import Path

from conftest import run_on_ranks
from lm.config import config_to_dict


def train_profiled_and_plain(rank, cfg_dict, dataset_dir, root):
    from lm.config import config_from_dict
    from lm.standalone import local_hooks
    from lm.trainer import train

    results = {}
    # (result, run, profile_at, stop_at_step): run "stopped" stops inside its window, then resumes past it.
    for name, run, profile_at, stop_at in (("plain", "plain", None, None), ("profiled", "profiled", 3, None),
                                           ("stopped", "stopped", 3, 3), ("resumed", "stopped", 3, None)):
        cfg = config_from_dict(cfg_dict)
        cfg.trainer.profile_at, cfg.trainer.profile_steps, cfg.trainer.stop_at_step = profile_at, 2, stop_at
        hooks, traces = local_hooks(f"{root}/{run}", rank, keep=1, log=lambda m, s: None), []
        hooks.profiled = traces.append
        metrics = train(cfg, dataset_dir, hooks)
        results[name] = (metrics["train_loss"], [str(t) for t in traces])
    return results


def test_profiled_steps_leave_a_trace_and_op_table_per_rank_and_train_as_without(tiny_train_config, prepared_tiny,
                                                                               tmp_path):
    prepared, vocab = prepared_tiny
    cfg = tiny_train_config(max_steps=6, ckpt_every=6, eval_every=6)
    cfg.model.vocab_size = vocab
    ranks = run_on_ranks(train_profiled_and_plain, 2, config_to_dict(cfg), str(prepared.directory), str(tmp_path),
                         tmp_path=tmp_path)

    window = tmp_path / "profiled" / "profile" / "steps_3-4"
    for rank, results in enumerate(ranks):
        plain_loss, plain_traces = results["plain"]
        loss, traces = results["profiled"]
        assert loss == plain_loss, "profiling changes nothing that is trained"
        assert plain_traces == [] and traces == [str(window / f"rank{rank}.pt.trace.json")]
        events = json.loads(Path(traces[0]).read_text())["traceEvents"]
        names = {e.get("name", "") for e in events}
        assert {n for n in names if n.startswith("ProfilerStep#")} == {"ProfilerStep#1", "ProfilerStep#2"}, \
            "the window's two steps, without the warm-up step"
        assert "aten::mm" in names or "aten::addmm" in names, "the model's matmuls are in the trace"
        assert any(n.startswith("gloo:all_reduce") or "all_reduce" in n for n in names), \
            "so are the gradient all-reduces between the ranks"
        table = (window / f"rank{rank}.ops.txt").read_text()
        assert "Self CPU" in table and "aten::" in table
        assert results["stopped"][1] == results["resumed"][1] == [], "stopped inside the window, resumed past it"
    assert sorted(p.name for p in window.iterdir()) == ["rank0.ops.txt", "rank0.pt.trace.json",
                                                        "rank1.ops.txt", "rank1.pt.trace.json"]
    assert not (tmp_path / "stopped" / "profile").exists()
