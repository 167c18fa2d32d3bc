"""Config: composition gives the documented recipes, and every bad input fails on the driver, before
Ray starts and before anything is written, with one line naming the field and what is allowed."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO, composed
from launcher.schema import to_train_config
from lm.config import ConfigError, global_batch_size, sequence_length


def test_defaults_are_the_small_model_on_stdlib_with_two_zero2_workers_and_offline_wandb():
    cfg = to_train_config(composed())
    assert (cfg.model.name, cfg.data.name, cfg.deepspeed.zero_stage) == ("small", "stdlib", 2)
    assert (cfg.cluster.num_workers, cfg.cluster.use_gpu, cfg.cluster.cpus_per_worker) == (2, False, 1)
    assert (cfg.logging.backend, cfg.logging.mode) == ("wandb", "offline")
    assert cfg.run.storage == "outputs/runs"
    assert global_batch_size(cfg) == cfg.trainer.micro_batch_size * cfg.trainer.grad_accum * 2


def test_wandb_reads_its_own_environment_variables_as_wandb_does_and_the_command_line_wins(monkeypatch):
    """WANDB_PROJECT, WANDB_ENTITY and WANDB_MODE, as W&B's tools honor them (set in a job's runtime_env
    on a cluster); `disabled` is logging=none; logging.* on the command line wins."""
    monkeypatch.setenv("WANDB_PROJECT", "team-lm")
    monkeypatch.setenv("WANDB_ENTITY", "acme")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = to_train_config(composed())
    assert (cfg.logging.project, cfg.logging.entity, cfg.logging.backend) == ("team-lm", "acme", "none")
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # W&B's old name for offline
    cfg = to_train_config(composed())
    assert (cfg.logging.backend, cfg.logging.mode) == ("wandb", "offline")
    assert to_train_config(composed("logging=wandb_online")).logging.mode == "online"
    cfg = to_train_config(composed("logging.project=mine", "logging.mode=online"))
    assert (cfg.logging.project, cfg.logging.mode) == ("mine", "online")
    monkeypatch.setenv("WANDB_MODE", "onlin")
    with pytest.raises(ConfigError, match=r"^logging.mode='onlin' \(from WANDB_MODE\) is invalid: allowed values are "
                                          r"offline, online, disabled$"):
        to_train_config(composed())


def test_shakespeare_char_is_nanogpts_cpu_recipe():
    cfg = to_train_config(composed("experiment=shakespeare_char", f"data.path={__file__}"))
    m, t, o = cfg.model, cfg.trainer, cfg.optim
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (4, 4, 128, 64, 0.0)
    assert m.activation == "gelu"  # nanoGPT's MLP: nn.GELU(), the exact one
    assert (cfg.data.tokenizer, cfg.deepspeed.zero_stage, cfg.cluster.num_workers) == ("char", 0, 1)
    assert (t.micro_batch_size, t.max_steps, t.eval_every, t.eval_steps) == (12, 2000, 250, 20)
    assert (o.lr, o.min_lr, o.warmup_steps, o.beta2, o.weight_decay, o.grad_clip) == (1e-3, 1e-4, 100, 0.99, 0.1, 1.0)
    assert sequence_length(cfg) == 64


@pytest.mark.parametrize("group,option", [("model", "tiny"), ("model", "gpt2-124m"), ("model", "llama-small"),
                                          ("deepspeed", "zero0"), ("deepspeed", "zero1"), ("deepspeed", "zero3"),
                                          ("deepspeed", "zero3_offload"), ("logging", "none"),
                                          ("logging", "wandb_online"), ("cluster", "multi_gpu")])
def test_every_group_option_composes_and_validates(group, option):
    cfg = to_train_config(composed(f"{group}={option}"))
    assert getattr(cfg, group).name == option


def test_schema_rejects_unknown_keys():
    with pytest.raises(Exception, match="no_such_key"):
        composed("trainer.no_such_key=1")


BAD_INPUTS = [
    (["model=huge"], "model='huge' is not an option: allowed values are gpt2-124m, llama-small, small, tiny"),
    (["model.n_embd=65"], "model.n_embd=65 is invalid: must be divisible by model.n_head=6"),
    (["trainer.max_step=10"], "trainer.max_step is not a config key (did you mean trainer.max_steps?): "
                              "trainer's keys are max_steps, micro_batch_size, "),
    (["-m", "optim.lr=1e-3,3e-3x"], "optim.lr='3e-3x' is invalid: must be a number"),  # each value of a sweep
    (["-m", "optim.lr=1e-3,2e-3", "trainer.micro_batch_size=4,0"],  # every job, before the first starts
     "trainer.micro_batch_size=0 is invalid: must be an integer >= 1 (in sweep job #1 of 4; no job was started)"),
    (["-m", "optim.lr=1e-3,2e-3", "run.name=mine"],  # job #1 would resume job #0's finished run
     "run.name='mine' names sweep jobs #0 and #1, which train differently: the second would resume the first's "
     "finished run; leave run.name out (each job's name then comes from what it trains) or name what varies, e.g. "
     "'run.name=mine-lr${optim.lr}'; no job was started"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage=4 is invalid: allowed values are 0, 1, 2, 3"),
    (["cluster.num_workers=0"], "cluster.num_workers=0 is invalid: must be an integer >= 1"),
    (["trainer.micro_batch_size=0"], "trainer.micro_batch_size=0 is invalid: must be an integer >= 1"),
    (["data.block_size=512"], "data.block_size=512 is invalid: must be between 1 and model.block_size=256"),
    (["data=text", "data.path=/no/such/file.txt"], "data.path='/no/such/file.txt' does not exist"),
    (["data=text"], "data.path=None is invalid: data=text needs data.path="),
    (["data.vocab_size=100"], "data.vocab_size=100 is invalid: byte-level BPE needs at least 256"),
    (["data.val_path=/some/val.txt"], "data.val_path='/some/val.txt' is invalid: applies to data=text and data=chat"),
    (["data=text", f"data.path={REPO}/README.md", "data.val_path=/no/val.txt"], "data.val_path='/no/val.txt' does not exist"),
    (["cluster.use_gpu=true"], "cluster.use_gpu=true is invalid: this machine has no CUDA GPU"),
    (["trainer.precision=fp8"], "trainer.precision='fp8' is invalid: allowed values are fp32, bf16, fp16, auto"),
    (["trainer.precision=fp16"], "trainer.precision='fp16' is invalid: fp16 needs GPU workers (cluster.use_gpu=true)"),
    (["trainer.stop_at_step=500"], "trainer.stop_at_step=500 is invalid: must be between 1 and trainer.max_steps"),
    (["data=text", f"data.path='{REPO}/README.md,{REPO}/cluster'", "data.weights=[1]"],
     "data.weights=[1.0] is invalid: must be 2 weights > 0, one per comma-separated item of data.path"),
    (["data.weights=[1]"], "data.weights=[1.0] is invalid: applies to data=text"),
    (["cluster.min_workers=3"], "cluster.min_workers=3 is invalid: must be between 1 and cluster.num_workers=2"),
    (["cluster.resize_interval_s=0"], "cluster.resize_interval_s=0.0 is invalid: must be > 0 (seconds)"),
    (["trainer.profile_at=1"], "trainer.profile_at=1 is invalid: must be between 2 (step 1 warms the profiler up)"),
    (["trainer.profile_at=219"], "trainer.profile_at=219 is invalid: must be between 2 (step 1 warms the profiler up) "
                                 "and trainer.max_steps - trainer.profile_steps + 1 = 218"),
]


@pytest.mark.parametrize("override,message", [
    ("optim.lr=inf", "optim.lr=inf is invalid: must be a finite number > 0"),
    ("optim.eps=0", "optim.eps=0.0 is invalid: must be a finite number > 0"),
    ("optim.weight_decay=inf", "optim.weight_decay=inf is invalid: must be a finite number >= 0"),
    ("model.norm_eps=0", "model.norm_eps=0.0 is invalid: must be a finite number > 0"),
    ("model.rope_theta=-1", "model.rope_theta=-1.0 is invalid: must be a finite number > 0"),
    ("model.mlp_hidden=0", "model.mlp_hidden=0 is invalid: must be an integer >= 1, or null"),
    ("trainer.seed=-2", "trainer.seed=-2 is invalid: must be an integer >= 0"),
    ("trainer.sample_tokens=-1", "trainer.sample_tokens=-1 is invalid: must be an integer >= 0 (0: no sample)"),
    ("deepspeed.reduce_bucket_size=0", "deepspeed.reduce_bucket_size=0 is invalid: must be an integer >= 1"),
    ("data.max_bytes=0", "data.max_bytes=0 is invalid: must be an integer >= 1, or null"),
    ("data.tokenizer_train_bytes=0", "data.tokenizer_train_bytes=0 is invalid: must be an integer >= 1"),
])
def test_values_that_would_fail_on_the_workers_or_train_nothing_are_refused_by_validate(override, message):
    """Found by trying edge values on every key: each of these used to pass validation, to fail later on
    the workers (numpy refuses a negative seed) or to make training meaningless (an infinite learning
    rate, a zero epsilon to divide by, empty DeepSpeed buckets)."""
    with pytest.raises(ConfigError) as error:
        to_train_config(composed(override))
    assert str(error.value).startswith(message), error.value


def run_launcher(tmp_path, *overrides):
    args = [sys.executable, "-m", "launcher.train", *overrides, "logging=none",
            f"run.storage={tmp_path}/runs", f"data.cache_dir={tmp_path}/cache"]
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("overrides,message", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_fails_with_one_line_before_ray_starts(tmp_path, overrides, message):
    result = run_launcher(tmp_path, *overrides)
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert error_lines == [error_lines[0]] and error_lines[0].startswith("config error: "), result.stderr
    assert message in error_lines[0]
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists(), "nothing may be written"


def test_overrides_hydra_would_refuse_fail_in_one_line_and_the_rest_pass():
    """Unknown keys, values of the wrong type and group options are checked against the schemas as
    Hydra would merge them; what only Hydra can judge (deletions, its own keys and flags,
    interpolations, other config files) is left to it."""
    from launcher.schema import check_overrides
    from launcher.train import CONFIG_GROUPS
    from lm.config import ExportAppConfig, ServeAppConfig, TrainConfig

    fine = ["-m", "optim.lr=3e-4,1e-3", "model=tiny,small", "experiment=shakespeare_char", "data.path='a.txt,b/'",
            "data.weights=[7,3]", "trainer.max_steps=range(10,30,10)", "cluster.address=auto", "logging.tags=[a,b]",
            "trainer.init_from=null", "model.rope_scaling.factor=2.0", "trainer.compile=yes", "trainer.seed='3'",
            "++trainer.seed=4", "~logging", "hydra.sweep.dir=/tmp/x", "hydra/launcher=basic", "optim.lr=${oc.env:LR}",
            "--cfg", "job", "optim.lr=interval(1e-4,1e-2)", "model=null"]
    check_overrides(fine, TrainConfig, CONFIG_GROUPS)
    check_overrides(["serve.port=8001", "serve.autoscaling=true", "run.name=x"], ServeAppConfig)
    check_overrides(["export.precision=int8", "export.max_ppl_increase=0.05"], ExportAppConfig)
    check_overrides(["-cn", "mine", "anything.at_all=1"], TrainConfig)  # another config: Hydra's to judge
    refused = {
        ("trainer.max_steps=abc",): "trainer.max_steps='abc' is invalid: must be an integer",
        ("model.n_embd=1.5",): "model.n_embd=1.5 is invalid: must be an integer",
        ("data.weights=[a]",): "data.weights=['a'] is invalid: must be a list of numbers or null",
        ("trainer.max_steps=null",): "trainer.max_steps=None is invalid: must be an integer",
        ("optim=3",): "optim=3 is invalid: must be a section, set by its keys (lr, schedule, ",
        ("nope=1",): "nope is not a config key: top-level keys are model, data, deepspeed, cluster, logging, trainer, ",
        # `+` adds a key Hydra's merge keeps and the run would silently ignore; on an existing key Hydra refuses
        ("+trainer.max_step=5",): "trainer.max_step is not a config key (did you mean trainer.max_steps?)",
        ("+trainer.max_steps=5",): "+trainer.max_steps: trainer.max_steps is already a config key; set it without the +",
        ("++trainer.max_steps=x",): "trainer.max_steps='x' is invalid: must be an integer",
        ("model.rope_scaling.factr=2",): "model.rope_scaling.factr is not a config key (did you mean "
                                         "model.rope_scaling.factor?): model.rope_scaling's keys are ",
        # a key in the wrong section, or without one, is found where it is
        ("trainer.lr=1e-3",): "trainer.lr is not a config key (did you mean optim.lr?): trainer's keys are ",
        ("max_steps=5",): "max_steps is not a config key (did you mean trainer.max_steps?): top-level keys are ",
        ("optim.max_steps=5",): "optim.max_steps is not a config key (did you mean trainer.max_steps?)",
        ("trainer.zero_stage=2",): "trainer.zero_stage is not a config key (did you mean deepspeed.zero_stage?)",
        ("trainer.warmup=10",): "trainer.warmup is not a config key (did you mean optim.warmup_steps?)",
        ("trainr.max_steps=5",): "trainr.max_steps is not a config key (did you mean trainer?)",
        ("model.vocab_size=100",): "model.vocab_size cannot be set: it is the tokenizer's vocabulary, padded to a "
                                   "multiple of 64 (set data.vocab_size, ",
        ("-m", "model=tiny,huge"): "model='huge' is not an option: allowed values are gpt2-124m, llama-small, small, tiny",
        ("a=[1,2",): "'a=[1,2' is not an override Hydra can read: no viable alternative at input '[1,2'",
    }
    for overrides, message in refused.items():
        with pytest.raises(ConfigError) as error:
            check_overrides(list(overrides), TrainConfig, CONFIG_GROUPS)
        assert str(error.value).startswith(message), error.value
    with pytest.raises(ConfigError, match=r"^serve.num_replica is not a config key \(did you mean serve.num_replicas\?\)"):
        check_overrides(["serve.num_replica=2"], ServeAppConfig)
    with pytest.raises(ConfigError, match=r"^export.precison is not a config key \(did you mean export.precision\?\)"):
        check_overrides(["export.precison=int8"], ExportAppConfig)
    with pytest.raises(ConfigError, match=r"^run.precision is not a config key \(did you mean export.precision\?\)"):
        check_overrides(["run.precision=int8"], ExportAppConfig)


def heavy_modules_imported_by(statement: str, heavy: tuple[str, ...]) -> list[str]:
    """The modules named `heavy` (and their submodules) that `statement` imports in a fresh interpreter."""
    probe = (f"import json, sys; {statement}; print(json.dumps(sorted(m for m in sys.modules "
             f"if m in {heavy!r} or m.startswith({tuple(h + '.' for h in heavy)!r}))))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_checking_a_command_line_does_not_import_torch():
    """Config errors come before any expensive work: the modules the check runs import no torch (~3 s)."""
    assert heavy_modules_imported_by("import launcher.train; from lm.pretrained import inspect_pretrained",
                                     ("torch", "deepspeed", "ray")) == []


def test_the_driver_imports_no_torch_before_ray_starts():
    """The token cache, the resume check and the run's summary import no torch, so the driver's ~1 s
    of importing it overlaps Ray's start (`init_local_ray`) instead of coming before it."""
    assert heavy_modules_imported_by("import launcher.train, launcher.summary, lm.checkpoint, lm.data, lm.corpus",
                                     ("torch",)) == []


def test_empty_corpus_is_rejected_by_name(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    result = run_launcher(tmp_path, "data=text", f"data.path={tmp_path}/empty.txt")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("config error: data.path=")
    assert "the corpus is empty" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_mixture_source_too_small_for_a_training_or_validation_window_is_rejected_by_name(tmp_path):
    (tmp_path / "big.txt").write_text("the quick brown fox jumps over the lazy dog " * 400)
    (tmp_path / "small.txt").write_text("a short note " * 30)
    path = f"{tmp_path}/big.txt,{tmp_path}/small.txt"
    result = run_launcher(tmp_path, "data=text", f"data.path='{path}'", "data.weights=[1,1]", "data.tokenizer=char")
    errors = [line for line in result.stderr.splitlines() if line.startswith("config error")]  # after the build's progress
    assert result.returncode == 2 and errors == [
        f"config error: data.val_fraction=0.1: the validation tail of source '{tmp_path}/small.txt' has 39 tokens, "
        "fewer than one sequence (257); raise it, add text, or give data.val_path"], result.stderr
    result = run_launcher(tmp_path, "data=text", f"data.path='{path}'", "data.weights=[1,1]", "data.tokenizer=char",
                          "data.val_fraction=0.5")
    assert f"config error: data.path='{path}': its source '{tmp_path}/small.txt' has 195 training tokens, fewer " \
        "than one sequence (257); drop it or add text" in result.stderr, result.stderr


@pytest.mark.parametrize("overrides,message", [
    (["model.activation=relu"], "model.activation='relu' is invalid: allowed values are gelu_tanh, gelu"),
    (["model=llama-small", "model.activation=gelu"],
     "model.activation='gelu' is invalid: applies to model.variant=gpt2; llama's MLP is SwiGLU"),
])
def test_model_activation_is_one_of_gpt2s_gelus(overrides, message):
    with pytest.raises(ConfigError) as error:
        to_train_config(composed(*overrides))
    assert str(error.value) == message


@pytest.mark.parametrize("overrides,message", [
    (["model=llama-small", "model.n_kv_head=4"],
     "model.n_kv_head=4 is invalid: must divide model.n_head=6 (each key/value head serves n_head / n_kv_head "
     "query heads), or null for one per query head"),
    (["model=llama-small", "model.n_kv_head=0"],
     "model.n_kv_head=0 is invalid: must divide model.n_head=6 (each key/value head serves n_head / n_kv_head "
     "query heads), or null for one per query head"),
    (["model.n_kv_head=2"],
     "model.n_kv_head=2 is invalid: grouped-query attention applies to model.variant=llama; gpt2 has one per "
     "query head (null or 6)"),
])
def test_key_value_heads_divide_the_query_heads_and_group_only_in_llama(overrides, message):
    with pytest.raises(ConfigError) as error:
        to_train_config(composed(*overrides))
    assert str(error.value) == message
    for fine in (["model=llama-small", "model.n_kv_head=2"], ["model.n_kv_head=6"]):
        to_train_config(composed(*fine))


@pytest.mark.parametrize("overrides,message", [
    (["model=llama-small", "model.rope_scaling.type=yarn"],
     "model.rope_scaling.type='yarn' is invalid: allowed values are none, llama3, linear"),
    (["model.rope_scaling.type=linear"],
     "model.rope_scaling.type='linear' is invalid: applies to model.variant=llama; gpt2 has learned positions (none)"),
    (["model=llama-small", "model.rope_scaling.type=linear", "model.rope_scaling.factor=0.5"],
     "model.rope_scaling.factor=0.5 is invalid: must be >= 1 (how many times longer the context)"),
    (["model=llama-small", "model.rope_scaling.type=llama3", "model.rope_scaling.low_freq_factor=4"],
     "model.rope_scaling.high_freq_factor=4.0 is invalid: must be above model.rope_scaling.low_freq_factor=4.0 > 0"),
])
def test_rope_scaling_is_llamas_and_its_factors_are_checked(overrides, message):
    with pytest.raises(ConfigError) as error:
        to_train_config(composed(*overrides))
    assert str(error.value) == message
    scaled = to_train_config(composed("model=llama-small", "model.rope_scaling.type=llama3")).model.rope_scaling
    assert (scaled.factor, scaled.low_freq_factor, scaled.high_freq_factor, scaled.original_max_position_embeddings) \
        == (8.0, 1.0, 4.0, 8192)  # Llama 3.1's


def test_validation_errors_are_config_errors_that_name_the_field():
    cfg = to_train_config(composed())
    cfg.model.n_head = 0
    with pytest.raises(ConfigError, match="model.n_head"):
        from lm.config import validate

        validate(cfg)


def test_derived_run_name_is_stable_for_a_command_and_changes_with_what_is_trained():
    from launcher.train import derive_run_name

    base = derive_run_name(to_train_config(composed("model=tiny")))
    assert base.startswith("tiny-")
    assert derive_run_name(to_train_config(composed("model=tiny"))) == base
    assert derive_run_name(to_train_config(composed("model=tiny", "trainer.stop_at_step=5"))) == base
    assert derive_run_name(to_train_config(composed("model=tiny", "trainer.profile_at=5", "trainer.profile_steps=2"))) == base
    assert derive_run_name(to_train_config(composed("model=tiny", "cluster.min_workers=1"))) == base
    assert derive_run_name(to_train_config(composed("model=tiny", "cluster.resize_interval_s=5"))) == base
    assert derive_run_name(to_train_config(composed("model=tiny", "logging=none"))) == base
    assert derive_run_name(to_train_config(composed("model=tiny", "cluster.include_dashboard=false"))) == base
    assert derive_run_name(to_train_config(composed("model=tiny", "optim.lr=3e-4"))) != base
    assert derive_run_name(to_train_config(composed("model=tiny", "model.activation=gelu"))) != base
    assert derive_run_name(to_train_config(composed("model=tiny", "model.n_kv_head=null"))) == base
    assert derive_run_name(to_train_config(composed("model=tiny", "model.n_kv_head=2"))) != base
    llama = derive_run_name(to_train_config(composed("model=llama-small")))
    assert derive_run_name(to_train_config(composed("model=llama-small", "model.rope_scaling.type=none"))) == llama
    assert derive_run_name(to_train_config(composed("model=llama-small", "model.rope_scaling.type=llama3"))) != llama


def test_derived_run_names_stay_what_earlier_versions_derived():
    # `make train` resumes the run its command names; a version that renamed the default runs would
    # start them over instead. A new setting belongs in launcher.train._NAME_UNCHANGED_AT.
    from launcher.train import derive_run_name

    assert derive_run_name(to_train_config(composed())) == "small-0c82334f"
    assert derive_run_name(to_train_config(composed("model=tiny"))) == "tiny-a3d32eae"


def test_sweep_table_shows_what_varies_and_each_final_loss():
    from launcher.sweep import format_table

    rows = [{"overrides": "optim.lr=0.001 model=tiny", "val_loss": 5.25, "run": "tiny-a", "status": "ok"},
            {"overrides": "optim.lr=0.003 model=tiny", "val_loss": None, "run": None, "status": "failed"}]
    lines = format_table(rows).splitlines()
    assert lines[2].split() == ["optim.lr=0.001", "5.2500", "tiny-a"]
    assert lines[3].split() == ["optim.lr=0.003", "failed"]


def test_min_lr_follows_lr_unless_set():
    from lm.config import min_learning_rate

    assert min_learning_rate(to_train_config(composed("optim.lr=1e-4")).optim) == pytest.approx(1e-5)
    assert min_learning_rate(to_train_config(composed("optim.lr=1e-3", "optim.min_lr=0")).optim) == 0.0
    with pytest.raises(ConfigError, match=r"optim.min_lr=0.01 is invalid"):
        to_train_config(composed("optim.lr=1e-3", "optim.min_lr=1e-2"))


def test_each_schedule_warms_up_alike_then_takes_its_shape():
    from lm.trainer import learning_rate

    def lr_at(schedule: str, step: int) -> float:
        optim = to_train_config(composed(f"optim.schedule={schedule}", "optim.lr=1e-3", "optim.min_lr=1e-4",
                                         "optim.warmup_steps=10")).optim
        return learning_rate(step, optim, max_steps=110)

    for schedule in ("cosine", "linear", "constant"):
        assert [lr_at(schedule, s) for s in (0, 9)] == pytest.approx([1e-3 / 11, 1e-3 * 10 / 11]), schedule
        assert lr_at(schedule, 10) == pytest.approx(1e-3), f"{schedule}: the peak right after warmup"
    assert lr_at("cosine", 35) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4)
    assert lr_at("linear", 35) == pytest.approx(1e-4 + 0.75 * 9e-4)
    assert lr_at("cosine", 110) == lr_at("linear", 110) == pytest.approx(1e-4), "both decay to min_lr at max_steps"
    assert lr_at("constant", 35) == lr_at("constant", 110) == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match=r"optim.schedule='wsd' is invalid: allowed values are cosine, linear, constant"):
        to_train_config(composed("optim.schedule=wsd"))


def test_online_wandb_without_an_api_key_is_refused_before_ray_starts(tmp_path, monkeypatch):
    from launcher.wandb_logger import check_credentials, wandb_hosts
    from lm.config import LoggingConfig

    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_CONFIG_DIR", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no ~/.config/wandb
    monkeypatch.chdir(tmp_path)
    online, offline = LoggingConfig(mode="online", dir=str(tmp_path / "w")), LoggingConfig(dir=str(tmp_path / "w"))
    check_credentials(offline)
    hosts = wandb_hosts()  # wandb 0.31 logs in to api.forge.coreweave.com and reads api.wandb.ai's key too
    assert "api.wandb.ai" in hosts
    with pytest.raises(ConfigError, match=rf"^logging.mode='online' needs a W&B API key for {hosts[0]}: set WANDB_API_KEY"):
        check_credentials(online)
    for host in hosts:  # what `wandb login` wrote, with this wandb or an older one
        (tmp_path / ".netrc").write_text(f"machine {host} login user password " + "y" * 40 + "\n")
        (tmp_path / ".netrc").chmod(0o600)
        check_credentials(online)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    check_credentials(online)
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / ".netrc").write_text("machine wandb.example.com login user password " + "y" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    with pytest.raises(ConfigError, match=f"for {hosts[0]}"):
        check_credentials(online)  # a key for another host is not W&B's
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    check_credentials(online)  # `wandb login --host` wrote it
    monkeypatch.delenv("WANDB_BASE_URL")
    (tmp_path / ".config" / "wandb").mkdir(parents=True)
    (tmp_path / ".config" / "wandb" / "settings").write_text("[default]\napi_key = " + "z" * 40 + "\n")
    check_credentials(online)

    # A key, but a server this machine cannot reach: refused here, not after wandb.init's 90 s in rank 0.
    import socket

    from conftest import free_port
    from launcher.wandb_logger import check_server

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    port = free_port()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    check_server(offline)
    with pytest.raises(ConfigError, match=rf"^logging.mode='online': the W&B server http://127.0.0.1:{port} cannot be "
                                          r"reached from here \(.*refused.*\); allowed: logging=wandb_offline"):
        check_server(online)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.com:3128")
    check_server(online)  # only W&B, through its proxy, can tell
    monkeypatch.delenv("HTTPS_PROXY")
    with socket.create_server(("127.0.0.1", port)):
        check_server(online)
    monkeypatch.delenv("WANDB_BASE_URL")

    result = subprocess.run([sys.executable, "-m", "launcher.train", "logging=wandb_online", f"run.storage={tmp_path}/runs",
                             f"data.cache_dir={tmp_path}/cache"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
                            | {"PYTHONPATH": str(REPO), "HOME": str(tmp_path / "empty_home")})
    assert result.returncode == 2, result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"config error: logging.mode='online' needs a W&B API key for {hosts[0]}: set WANDB_API_KEY (on a cluster, in "
        "the job's runtime_env env_vars) or run `wandb login`; allowed without one: logging=wandb_offline or logging=none"]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists(), "nothing may be written"


@pytest.mark.parametrize("overrides,copies", [
    ([], False),  # one machine: the files are where the user is
    (["run.storage=s3://bucket/runs"], True),
    (["cluster=multi_node"], True),
    (["cluster=multi_node", "logging=wandb_online"], False),  # streamed: nothing to copy
    (["run.storage=s3://bucket/runs", "logging=none"], False),
])
def test_offline_wandb_runs_are_copied_to_storage_when_rank_0_may_be_on_another_node(overrides, copies):
    from launcher.wandb_logger import copies_offline_run, offline_copy

    assert copies_offline_run(to_train_config(composed(*overrides), check=False)) is copies
    assert offline_copy("/node/outputs/wandb/wandb/offline-run-20261201_050000-abc123") == \
        "wandb/offline-run-20261201_050000-abc123"


def test_a_finished_wandb_logger_leaves_nothing_in_the_temp_dir_of_a_process_ending_as_ray_workers_do(tmp_path):
    """Ray ends a worker's process without atexit hooks, so W&B's own clean-up (its service's socket
    directory, the temporary directories importing wandb makes) never ran: the logger does it. The
    process here ends with os._exit, as a Ray worker does; the run's records are all there."""
    from wandb_offline import read_run

    temp = tmp_path / "tmp"
    temp.mkdir()
    script = f"""
import os
from launcher.wandb_logger import WandbLogger, remove_import_temporaries
from lm.config import LoggingConfig

logger = WandbLogger(LoggingConfig(dir={str(tmp_path / "wandb")!r}), "leak-check", None, {{"lr": 0.1}})
logger.log({{"loss": 1.5}}, 1)
logger.finish()
remove_import_temporaries()
print(logger.run_dir)
os._exit(0)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TMPDIR": str(temp), "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in temp.iterdir()) == []
    run = read_run(result.stdout.strip().splitlines()[-1])
    assert run["history"][0]["loss"] == 1.5 and run["config"]["lr"] == 0.1
