"""DeepSpeed integration is correct, not just running: on 2 workers, ZeRO 0-3 give the same losses
and final weights as a plain single-process torch loop over the same global batches (fp32)."""

import pytest
import torch

from conftest import run_on_ranks
from lm.checkpoint import load_consolidated_state_dict
from lm.config import config_to_dict, sequence_length
from lm.data import PreparedData
from lm.shard_loader import TokenShardLoader
from lm.model import GPT
from lm.trainer import build_optimizer, learning_rate, seed_everything

STAGES = (0, 1, 2, 3)


def train_every_stage(rank, cfg_dict, dataset_dir, root):
    """On each rank: one real run of lm.trainer.train per ZeRO stage; returns rank 0's losses."""
    from lm.config import config_from_dict
    from lm.standalone import local_hooks
    from lm.trainer import train

    losses = {}
    for stage in STAGES:
        cfg = config_from_dict(cfg_dict)
        cfg.deepspeed.zero_stage = stage
        run_dir = f"{root}/zero{stage}"
        logged = []
        hooks = local_hooks(run_dir, rank, keep=1, log=lambda m, s: logged.append((s, m.get("train_loss"))))
        train(cfg, dataset_dir, hooks)
        losses[stage] = [loss for _, loss in logged if loss is not None]
    return losses


def plain_torch_losses(cfg, data: PreparedData, world: int):
    """The reference: one process, the whole global batch, torch AdamW and clipping."""
    torch.set_num_threads(1)
    seed_everything(cfg.trainer.seed)
    model = GPT(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    loaders = [TokenShardLoader(data.tokens("train"), sequence_length(cfg), cfg.trainer.micro_batch_size,
                                r, world, cfg.trainer.seed) for r in range(world)]
    losses = []
    for step in range(cfg.trainer.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg.optim, cfg.trainer.max_steps)
        total = 0.0
        for _ in range(cfg.trainer.grad_accum):
            xs, ys = zip(*(ld.next_batch() for ld in loaders))
            _, loss = model(torch.cat(xs), torch.cat(ys))
            (loss / cfg.trainer.grad_accum).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / cfg.trainer.grad_accum)
    return losses, model.state_dict()


def test_zero_stages_match_a_plain_torch_loop(tiny_train_config, prepared_tiny, tmp_path):
    prepared, vocab = prepared_tiny

    cfg = tiny_train_config(max_steps=5, ckpt_every=5, eval_every=5)
    cfg.model.vocab_size = vocab
    # Large steps from the first one, and clipping active (grad norms here exceed 0.5).
    cfg.optim.warmup_steps, cfg.optim.lr, cfg.optim.grad_clip = 1, 3e-3, 0.5
    expected_losses, expected_state = plain_torch_losses(cfg, prepared, world=2)

    results = run_on_ranks(train_every_stage, 2, config_to_dict(cfg), str(prepared.directory), str(tmp_path),
                           tmp_path=tmp_path)
    for stage in STAGES:
        losses = results[0][stage]
        assert len(losses) == cfg.trainer.max_steps
        assert losses == pytest.approx(expected_losses, rel=1e-5, abs=1e-6), f"ZeRO-{stage} losses differ"
        state = load_consolidated_state_dict(tmp_path / f"zero{stage}" / f"checkpoint_{cfg.trainer.max_steps:06d}")
        for name, expected in expected_state.items():
            if name == "lm_head.weight":
                continue  # tied to wte.weight
            # Adam divides by sqrt(v): near-zero gradients turn reduction-order noise into ~lr*1e-3.
            torch.testing.assert_close(state[name], expected, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"ZeRO-{stage} {name}: {m}")
    assert expected_losses[-1] < expected_losses[0]


def train_bf16_twice(rank, cfg_dict, dataset_dir):
    """Two bf16 ZeRO-0 engines from the same weights on the same batches, DeepSpeed's own and one
    without its redundant work; a NaN gradient midway. Parameters after each step, per engine."""
    import deepspeed

    from lm.config import config_from_dict
    from lm.deepspeed_config import deepspeed_config
    from lm.trainer import _GradNormCatchesOverflow, init_distributed, skip_redundant_engine_work

    init_distributed()
    cfg = config_from_dict(cfg_dict)
    data = PreparedData.load(dataset_dir)
    engines = []
    for lean in (False, True):
        seed_everything(cfg.trainer.seed)
        model = GPT(cfg.model)
        engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim),
                                          config=deepspeed_config(cfg))
        if lean:
            skip_redundant_engine_work(engine, cfg.deepspeed.zero_stage, world=1)
            assert isinstance(engine.optimizer.overflow_checker, _GradNormCatchesOverflow)
            assert not engine.enable_backward_allreduce
        engines.append(engine)
    loader = TokenShardLoader(data.tokens("train"), sequence_length(cfg), cfg.trainer.micro_batch_size, 0, 1, 0)
    history = {False: [], True: []}
    for step in range(5):
        x, y = loader.next_batch()
        for lean, engine in zip((False, True), engines):
            _, loss = engine(x, y)
            engine.backward(loss)
            if step == 2:  # a bad gradient: the step must be skipped
                next(engine.module.parameters()).grad.view(-1)[0] = float("nan")
            engine.step()
            history[lean].append(({k: v.clone() for k, v in engine.module.state_dict().items()},
                                  engine.optimizer.overflow))
    return history


def test_bf16_zero0_without_redundant_work_trains_the_same_bits(tiny_train_config, prepared_tiny, tmp_path):
    prepared, vocab = prepared_tiny
    cfg = tiny_train_config(grad_accum=1)
    cfg.model.vocab_size, cfg.cluster.num_workers = vocab, 1
    cfg.trainer.precision, cfg.deepspeed.zero_stage = "bf16", 0
    history = run_on_ranks(train_bf16_twice, 1, config_to_dict(cfg), str(prepared.directory), tmp_path=tmp_path)[0]
    for step, ((plain, plain_skipped), (lean, lean_skipped)) in enumerate(zip(history[False], history[True])):
        assert plain_skipped == lean_skipped == (step == 2), f"step {step}: only the NaN step is skipped"
        for name, value in plain.items():
            assert value.dtype == torch.bfloat16 and torch.equal(value, lean[name]), f"step {step}: {name} differs"
    assert not torch.equal(history[True][1][0]["wte.weight"], history[True][3][0]["wte.weight"]), "it trained"
    assert all(torch.equal(history[True][1][0][k], v) for k, v in history[True][2][0].items()), "NaN step skipped"


def train_bf16_with_a_bad_rank(rank, cfg_dict, dataset_dir):
    """bf16 ZeRO-0 on 2 ranks without the overflow scan (and its all-reduced flag); rank 1's loss is
    NaN at step 2. Per step: whether it was skipped, and every rank's parameter sums."""
    import deepspeed

    from lm.config import config_from_dict
    from lm.deepspeed_config import deepspeed_config
    from lm.trainer import _GradNormCatchesOverflow, init_distributed, skip_redundant_engine_work

    init_distributed()
    cfg = config_from_dict(cfg_dict)
    seed_everything(cfg.trainer.seed)
    model = GPT(cfg.model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim), config=deepspeed_config(cfg))
    skip_redundant_engine_work(engine, cfg.deepspeed.zero_stage, world=2)
    assert isinstance(engine.optimizer.overflow_checker, _GradNormCatchesOverflow)
    data = PreparedData.load(dataset_dir)
    loader = TokenShardLoader(data.tokens("train"), sequence_length(cfg), cfg.trainer.micro_batch_size, rank, 2, 0)
    steps = []
    for step in range(4):
        x, y = loader.next_batch()
        _, loss = engine(x, y)
        engine.backward(loss * float("nan") if (step, rank) == (2, 1) else loss)
        engine.step()
        sums = torch.stack([p.float().sum() for p in engine.module.parameters()])
        gathered = [torch.zeros_like(sums) for _ in range(2)]
        torch.distributed.all_gather(gathered, sums)
        steps.append((engine.optimizer.overflow, gathered))
    return steps


def test_bf16_zero0_ranks_skip_a_bad_step_together_without_the_overflow_scan(tiny_train_config, prepared_tiny, tmp_path):
    prepared, vocab = prepared_tiny
    cfg = tiny_train_config(grad_accum=1)
    cfg.model.vocab_size = vocab
    cfg.trainer.precision, cfg.deepspeed.zero_stage = "bf16", 0
    results = run_on_ranks(train_bf16_with_a_bad_rank, 2, config_to_dict(cfg), str(prepared.directory), tmp_path=tmp_path)
    for rank, steps in enumerate(results):
        for step, (skipped, (rank0_sums, rank1_sums)) in enumerate(steps):
            assert skipped == (step == 2), f"rank {rank}, step {step}: the all-reduced NaN skips it on every rank"
            assert torch.equal(rank0_sums, rank1_sums), f"step {step}: the ranks' weights differ"
    assert not torch.equal(results[0][0][1][0], results[0][3][1][0]), "it trained"
