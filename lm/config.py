"""Typed configuration for the whole training path.

These dataclasses are the schema: the launcher registers them with Hydra so a typo fails at
composition, and `validate` checks values (ranges, cross-field rules) on the driver before any
worker starts. Workers receive a plain dict and rebuild the objects with `config_from_dict`.
Derived values (global batch, sequence length, padded vocab) are computed here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A user-facing configuration error: one line naming the field and what is allowed."""


@dataclass
class RopeScalingConfig:
    """RoPE frequencies stretched for a longer context, as Hugging Face's `rope_scaling`: "llama3" (Llama
    3.1/3.2: long wavelengths divided by `factor`, short ones kept, the band between blended), "linear"
    (every frequency divided by `factor`: position interpolation), or "none". The defaults are Llama 3.1's."""
    type: str = "none"
    factor: float = 8.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only: the context the model was pretrained at


@dataclass
class ModelConfig:
    name: str = "small"
    variant: str = "gpt2"  # gpt2: learned positions, LayerNorm, GELU; llama: RoPE, RMSNorm, SwiGLU
    # gpt2's MLP: gelu_tanh (GPT-2's "gelu_new") or gelu (exact, erf: nanoGPT's nn.GELU, and 1.4-2x
    # faster on a CPU). llama's MLP is SwiGLU: it takes the default only
    activation: str = "gelu_tanh"
    n_layer: int = 6
    n_head: int = 6
    # Key/value heads. None: one per query head. Fewer (llama only): grouped-query attention, as in
    # Llama 2 70B, Llama 3, TinyLlama and SmolLM; n_head / n_kv_head query heads share each, which
    # shrinks the attention's key/value projections and the serving KV cache by that factor.
    n_kv_head: Optional[int] = None
    n_embd: int = 384
    block_size: int = 256  # the model's maximum context (positions)
    dropout: float = 0.0
    bias: bool = True  # biases in linear layers and norms (GPT-2 has them, Llama does not)
    qkv_bias: Optional[bool] = None  # biases in the query/key/value projection alone; None: as `bias` (Qwen2: true)
    mlp_hidden: Optional[int] = None  # None: 4*n_embd (gpt2) or ~8/3*n_embd rounded to 64 (llama)
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)  # llama only
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # the output head is the token embedding (GPT-2); Llama 2/3 untie it
    activation_checkpointing: bool = False
    vocab_size: Optional[int] = None  # filled from the tokenizer by `derive`; never typed by hand


@dataclass
class DataConfig:
    name: str = "stdlib"
    source: str = "stdlib"  # stdlib: the Python standard library's source; files: `path`; chat: conversations
    path: Optional[str] = None  # file, directory or glob; several separated by commas
    text_field: str = "text"  # the field read from .jsonl lines; the column read from .parquet/.arrow
    tokenizer: str = "bpe"  # bpe: byte-level BPE trained on the corpus; char: one id per character
    vocab_size: int = 8192  # BPE only
    block_size: Optional[int] = None  # training sequence length; None: model.block_size
    val_fraction: float = 0.02  # the share of the corpus held out for validation, unless val_path is set
    val_path: Optional[str] = None  # validation files (as path); set: all of path trains, val_fraction is unused
    tokenizer_train_bytes: int = 8_000_000  # BPE is trained on this many bytes of the corpus
    max_bytes: Optional[int] = None  # cap on the corpus text read, in UTF-8 bytes (None: all; a mixture: per source)
    # A mixture: one weight per comma-separated item of `path` (each a file, directory or glob: a
    # source), its share of the training windows; each source keeps its own val split. None: one corpus.
    weights: Optional[list[float]] = None
    cache_dir: str = "outputs/cache"
    max_bad_fraction: float = 0.01  # skip (and report) chat's bad lines, text files not in UTF-8; more stops the run
    # chat: auto renders with the pretrained model's own template (trainer.init_from's tokenizer_config.json)
    # where it has one, else the built-in one; builtin always uses the built-in one (lm/chat_template.py)
    chat_template: str = "auto"


@dataclass
class DeepSpeedConfig:
    name: str = "zero2"
    zero_stage: int = 2
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer state to CPU memory
    offload_params: bool = False  # ZeRO-3 only: parameters offloaded to CPU memory
    overlap_comm: bool = False
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000


@dataclass
class ClusterConfig:
    name: str = "local"
    address: Optional[str] = None  # None: start a local Ray; "auto" or ray://host:port: connect
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    placement_strategy: str = "PACK"
    max_failures: int = 0
    # Elastic: after a lost worker or node, the group restarts with as few as min_workers workers
    # rather than waiting for num_workers (None: always num_workers), from the latest checkpoint,
    # resharded; it grows back when resources return. Each worker keeps its micro batch.
    min_workers: Optional[int] = None
    resize_interval_s: float = 60.0  # elastic: how often a running group checks for room to grow (Ray's default)
    multi_node: bool = False  # workers may land on several nodes: run.storage must be shared
    shared_storage: Optional[bool] = None  # is run.storage reachable from every node? None: detect
    include_dashboard: bool = True  # Ray's dashboard on 127.0.0.1:8265, for a Ray the launcher starts itself


@dataclass
class LoggingConfig:
    name: str = "wandb_offline"
    backend: str = "wandb"  # wandb or none
    mode: str = "offline"  # offline or online
    project: str = "lm"
    entity: Optional[str] = None
    group: Optional[str] = None  # None: multirun jobs share their sweep's group automatically
    dir: str = "outputs/wandb"
    tags: list[str] = field(default_factory=list)  # W&B run tags, e.g. logging.tags=[baseline,bf16]
    notes: Optional[str] = None  # W&B run notes
    log_model: bool = False  # the final checkpoint as a W&B model artifact, by reference to its storage


@dataclass
class TrainerConfig:
    max_steps: int = 600
    micro_batch_size: int = 8
    grad_accum: int = 1
    eval_every: int = 100
    eval_steps: int = 10
    ckpt_every: int = 200
    log_every: int = 10
    seed: int = 1337
    precision: str = "fp32"  # fp32, bf16, fp16 (GPUs), or auto: bf16 where every worker multiplies bf16 natively
    stop_at_step: Optional[int] = None  # checkpoint and exit here; the schedule still follows max_steps
    keep_checkpoints: int = 2
    sample_tokens: int = 160  # length of the sample printed after training
    init_from: Optional[str] = None  # fine-tune: our export directory or a local Hugging Face GPT-2/Llama dir
    compile: bool = False  # torch.compile the model (DeepSpeed's engine.compile): pays on GPUs, costs start-up
    # torch.profiler traces of steps profile_at .. profile_at+profile_steps-1, every rank, in <run>/profile
    profile_at: Optional[int] = None
    profile_steps: int = 3


@dataclass
class OptimConfig:
    lr: float = 1e-3
    schedule: str = "cosine"  # after warmup: cosine or linear decay to min_lr at max_steps, or constant lr
    min_lr: Optional[float] = None  # None: lr / 10, so a sweep over lr keeps the schedule's shape
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class RunConfig:
    name: Optional[str] = None  # None: derived from the model name and a hash of the config
    storage: str = "outputs/runs"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class ExportConfig:
    precision: str = "fp32"  # fp32, bf16 or int8 (int8 weights per output channel; activations quantized when served)
    max_ppl_increase: float = 0.02  # refuse an artifact whose val perplexity rises more (relative)
    force: bool = False  # write it anyway
    eval_batches: int = 16  # val batches (4 sequences each) for the perplexity check
    checkpoint: Optional[str] = None  # None: the run's latest checkpoint


@dataclass
class ExportAppConfig:
    run: RunConfig = field(default_factory=RunConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


@dataclass
class ServeConfig:
    export_dir: Optional[str] = None  # None: the newest export of run.name (or of the newest run)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None  # None: no auth (or LMSTACK_API_KEY from the environment)
    num_replicas: int = 1
    autoscaling: bool = False  # scale 1..num_replicas replicas on ongoing requests
    max_batch_size: int = 16  # sequences decoded together per replica
    stream_interval_ms: int = 40  # a stream's text goes out at most this often (the first token at once)
    stream_events_per_s: int = 100  # a replica's streams together send about this many chunks/s at most (0: no cap)
    cpus_per_replica: int = 1
    gpus_per_replica: float = 0  # > 0: replicas are placed on GPUs and decode there (CUDA)
    compile: bool = False  # compile the decode step ahead of time at start-up (lm.compiled_decode): faster decoding
    # Prompt + answer tokens a sequence may hold (vLLM's max_model_len); None: the model's whole context.
    # Each replica keeps a KV cache of max_batch_size sequences of this length: a long-context model
    # (Llama 3.2: 131,072 positions) needs a shorter one.
    max_model_len: Optional[int] = None
    # A Hugging Face directory's weights as served (vLLM's dtype): auto is its config's dtype (bf16 for
    # most) on GPUs and fp32 on CPUs; an export serves in the precision it was exported in.
    dtype: str = "auto"
    # Where requests' unset sampling values come from (vLLM's --generation-config): auto, the model's
    # generation_config.json (Qwen's temperature 0.7, top_p 0.8, ...); none, the API's own defaults
    # (vLLM's `vllm`); or a directory holding a generation_config.json to take them from instead.
    generation_config: str = "auto"
    # Prefix caching (vLLM's enable_prefix_caching): the keys and values of earlier prompts and replies are
    # kept, so a shared system prompt or a conversation's earlier turns are not prefilled again.
    enable_prefix_caching: bool = True
    prefix_cache_tokens: Optional[int] = None  # tokens each replica keeps; None: 4 x max_model_len
    # Chunked prefill (vLLM's name and meaning): the tokens a step processes, decode tokens included; what
    # the running streams leave goes to prompts, so a long prompt is prefilled over several steps while
    # they keep decoding. None: 256 on CPUs, 2048 on GPUs.
    max_num_batched_tokens: Optional[int] = None
    # How the ingress picks a model replica for a request: power_of_two, Serve's default, by load alone;
    # prefix_affinity, the replica that already holds the prompt's longest prefix in its prefix cache
    # unless it has more than 2 requests (on GPUs max(2, max_batch_size / 8)) beyond the least busy one
    # (SGLang's cache-aware routing). Opt-in, as Ray Serve LLM's: where prompts share nothing it cost 5-13%
    # tokens/s in short bursty runs here (none in longer ones).
    request_router: str = "power_of_two"
    # Where Prometheus scrapes the Ray that `launcher.serve` starts (its metrics export port: Ray's, Serve's
    # and the replicas' engine metrics, launcher.serve_metrics); None: a free port, printed at start-up.
    metrics_port: Optional[int] = None
    # Ray's dashboard for the Ray that `launcher.serve` starts (127.0.0.1:8265, or the next free port):
    # what Serve's own CLI (`serve status`) and the dashboard's Serve page read.
    include_dashboard: bool = True
    # Seconds a Ctrl-C or SIGTERM (docker stop, Kubernetes) waits for the requests in flight to finish,
    # new ones answered 503, before Serve and its Ray shut down (Serve's own name and default; keep it
    # below Kubernetes' terminationGracePeriodSeconds, 30 by default).
    graceful_shutdown_timeout_s: float = 20.0


SERVE_DTYPES = ("auto", "fp32", "bf16")
REQUEST_ROUTERS = ("power_of_two", "prefix_affinity")


@dataclass
class ServeAppConfig:
    run: RunConfig = field(default_factory=RunConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


# ---------------------------------------------------------------------------------------------
# Derived values: computed once, here.


def path_items(path: Optional[str]) -> list[str]:
    """The comma-separated items of data.path (or data.val_path): a file, directory or glob each."""
    return [item.strip() for item in str(path or "").split(",") if item.strip()]


def sequence_length(cfg: TrainConfig) -> int:
    return cfg.data.block_size or cfg.model.block_size


def global_batch_size(cfg: TrainConfig) -> int:
    """Sequences per optimizer step: micro batch x accumulation x workers (DeepSpeed's train_batch_size)."""
    return cfg.trainer.micro_batch_size * cfg.trainer.grad_accum * cfg.cluster.num_workers


def tokens_per_step(cfg: TrainConfig) -> int:
    return global_batch_size(cfg) * sequence_length(cfg)


def padded_vocab_size(tokenizer_vocab_size: int, multiple: int = 64) -> int:
    """Embedding rows rounded up so matmuls stay aligned; the extra rows are never targets."""
    return -(-tokenizer_vocab_size // multiple) * multiple


def min_learning_rate(optim: OptimConfig) -> float:
    return optim.lr / 10 if optim.min_lr is None else optim.min_lr


def has_qkv_bias(model: ModelConfig) -> bool:
    """Whether the query/key/value projection has biases: model.qkv_bias, or as every layer (model.bias)."""
    return model.bias if model.qkv_bias is None else model.qkv_bias


def kv_heads(model: ModelConfig) -> int:
    """Key/value heads: model.n_kv_head, or one per query head."""
    return model.n_kv_head or model.n_head


def mlp_hidden_size(model: ModelConfig) -> int:
    if model.mlp_hidden:
        return model.mlp_hidden
    if model.variant == "llama":
        return -(-int(8 * model.n_embd / 3) // 64) * 64
    return 4 * model.n_embd


# ---------------------------------------------------------------------------------------------
# Validation: every rule a user can break, with the field's name and what is allowed.

_CHOICES = {
    "model.variant": ("gpt2", "llama"),
    "model.activation": ("gelu_tanh", "gelu"),
    "model.rope_scaling.type": ("none", "llama3", "linear"),
    "data.source": ("stdlib", "files", "chat"),
    "data.tokenizer": ("bpe", "char"),
    "data.chat_template": ("auto", "builtin"),
    "logging.backend": ("wandb", "none"),
    "logging.mode": ("offline", "online"),
    "trainer.precision": ("fp32", "bf16", "fp16", "auto"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "cluster.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
}


def _get(cfg: TrainConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _require(ok: bool, field_name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}={value!r} is invalid: {allowed}")


def _validate_rope_scaling(m: ModelConfig) -> None:
    r = m.rope_scaling
    if r.type == "none":
        return
    _require(m.variant == "llama", "model.rope_scaling.type", r.type,
             "applies to model.variant=llama; gpt2 has learned positions (none)")
    _require(r.factor >= 1, "model.rope_scaling.factor", r.factor, "must be >= 1 (how many times longer the context)")
    if r.type == "llama3":
        _require(0 < r.low_freq_factor < r.high_freq_factor, "model.rope_scaling.high_freq_factor",
                 r.high_freq_factor, f"must be above model.rope_scaling.low_freq_factor={r.low_freq_factor} > 0")
        _require(r.original_max_position_embeddings >= 1, "model.rope_scaling.original_max_position_embeddings",
                 r.original_max_position_embeddings, "must be an integer >= 1")


def validate(cfg: TrainConfig) -> None:
    """Raise ConfigError on the first invalid value. Cheap: touches no files but data paths."""
    for name, allowed in _CHOICES.items():
        value = _get(cfg, name)
        _require(value in allowed, name, value, "allowed values are " + ", ".join(allowed))

    m, t, o, c, d, ds = cfg.model, cfg.trainer, cfg.optim, cfg.cluster, cfg.data, cfg.deepspeed
    for name in ("model.n_layer", "model.n_head", "model.n_embd", "model.block_size"):
        _require(_get(cfg, name) >= 1, name, _get(cfg, name), "must be an integer >= 1")
    _require(m.n_embd % m.n_head == 0, "model.n_embd", m.n_embd,
             f"must be divisible by model.n_head={m.n_head}")
    if m.n_kv_head is not None:
        _require(m.n_kv_head >= 1 and m.n_head % m.n_kv_head == 0, "model.n_kv_head", m.n_kv_head,
                 f"must divide model.n_head={m.n_head} (each key/value head serves n_head / n_kv_head query heads), "
                 "or null for one per query head")
        _require(m.variant == "llama" or m.n_kv_head == m.n_head, "model.n_kv_head", m.n_kv_head,
                 f"grouped-query attention applies to model.variant=llama; gpt2 has one per query head "
                 f"(null or {m.n_head})")
    _require(m.variant == "gpt2" or m.activation == "gelu_tanh", "model.activation", m.activation,
             "applies to model.variant=gpt2; llama's MLP is SwiGLU")
    if m.variant == "llama":
        _require((m.n_embd // m.n_head) % 2 == 0, "model.n_embd", m.n_embd,
                 "RoPE needs an even head size (n_embd / n_head)")
    _validate_rope_scaling(m)
    _require(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
    _require(m.mlp_hidden is None or m.mlp_hidden >= 1, "model.mlp_hidden", m.mlp_hidden,
             "must be an integer >= 1, or null (4 x n_embd for gpt2, ~8/3 x n_embd for llama)")
    for name in ("model.rope_theta", "model.norm_eps"):
        _require(0 < _get(cfg, name) < math.inf, name, _get(cfg, name), "must be a finite number > 0")

    _require(ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", ds.zero_stage,
             "allowed values are 0, 1, 2, 3")
    for name in ("deepspeed.reduce_bucket_size", "deepspeed.allgather_bucket_size"):
        _require(_get(cfg, name) >= 1, name, _get(cfg, name), "must be an integer >= 1 (elements)")
    _require(not ds.offload_params or ds.zero_stage == 3, "deepspeed.offload_params",
             ds.offload_params, "parameter offload needs deepspeed.zero_stage=3")
    _require(not ds.offload_optimizer or ds.zero_stage >= 1, "deepspeed.offload_optimizer",
             ds.offload_optimizer, "optimizer offload needs deepspeed.zero_stage >= 1")

    _require(c.num_workers >= 1, "cluster.num_workers", c.num_workers, "must be an integer >= 1")
    _require(c.cpus_per_worker >= 1, "cluster.cpus_per_worker", c.cpus_per_worker,
             "must be an integer >= 1")
    if c.min_workers is not None:
        _require(1 <= c.min_workers <= c.num_workers, "cluster.min_workers", c.min_workers,
                 f"must be between 1 and cluster.num_workers={c.num_workers}, or null (a fixed worker count)")
    _require(c.resize_interval_s > 0, "cluster.resize_interval_s", c.resize_interval_s, "must be > 0 (seconds)")
    _require(c.max_failures >= -1, "cluster.max_failures", c.max_failures,
             "must be >= 0, or -1 for unlimited retries")

    for name in ("trainer.micro_batch_size", "trainer.grad_accum", "trainer.max_steps",
                 "trainer.eval_every", "trainer.eval_steps", "trainer.ckpt_every",
                 "trainer.log_every", "trainer.keep_checkpoints"):
        _require(_get(cfg, name) >= 1, name, _get(cfg, name), "must be an integer >= 1")
    _require(t.precision != "fp16" or c.use_gpu, "trainer.precision", t.precision,
             "fp16 needs GPU workers (cluster.use_gpu=true): DeepSpeed refuses it on CPUs, which emulate it; "
             "use bf16 or fp32 there")
    if t.stop_at_step is not None:
        _require(1 <= t.stop_at_step <= t.max_steps, "trainer.stop_at_step", t.stop_at_step,
                 f"must be between 1 and trainer.max_steps={t.max_steps}, or null")
    _require(t.profile_steps >= 1, "trainer.profile_steps", t.profile_steps, "must be an integer >= 1")
    _require(t.seed >= 0, "trainer.seed", t.seed, "must be an integer >= 0")
    _require(t.sample_tokens >= 0, "trainer.sample_tokens", t.sample_tokens, "must be an integer >= 0 (0: no sample)")
    if t.profile_at is not None:
        last = t.max_steps - t.profile_steps + 1
        _require(2 <= t.profile_at <= last, "trainer.profile_at", t.profile_at,
                 f"must be between 2 (step 1 warms the profiler up) and trainer.max_steps - trainer.profile_steps "
                 f"+ 1 = {last}, or null (no profile)")

    _require(0 < o.lr < math.inf, "optim.lr", o.lr, "must be a finite number > 0")
    if o.min_lr is not None:
        _require(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}], or null for lr/10")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _require(0 <= o.weight_decay < math.inf, "optim.weight_decay", o.weight_decay, "must be a finite number >= 0")
    _require(0 < o.eps < math.inf, "optim.eps", o.eps, "must be a finite number > 0")
    _require(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")
    _require(0 <= o.beta1 < 1, "optim.beta1", o.beta1, "must be in [0, 1)")
    _require(0 <= o.beta2 < 1, "optim.beta2", o.beta2, "must be in [0, 1)")

    seq = sequence_length(cfg)
    _require(1 <= seq <= m.block_size, "data.block_size", seq,
             f"must be between 1 and model.block_size={m.block_size} (the model's maximum context)")
    _require(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in (0, 1)")
    if d.tokenizer == "bpe":
        _require(d.vocab_size >= 256, "data.vocab_size", d.vocab_size,
                 "byte-level BPE needs at least 256 (one id per byte)")
        _require(d.vocab_size <= 2**20, "data.vocab_size", d.vocab_size, "must be <= 1048576")
    if d.source == "files":
        _require(bool(d.path), "data.path", d.path,
                 "data=text needs data.path=<file, directory or glob> of .txt/.md/.jsonl/.parquet/.arrow files")
    if d.source == "chat":
        _require(bool(d.path), "data.path", d.path,
                 "data=chat needs data.path=<.jsonl, .parquet or .arrow file(s) of conversations>")
    if d.weights is not None:
        _require(d.source in ("files", "chat"), "data.weights", d.weights,
                 "applies to data=text and data=chat (a mixture of data.path's items)")
        sources = len(path_items(d.path))
        _require(len(d.weights) == sources and all(w > 0 for w in d.weights), "data.weights", d.weights,
                 f"must be {sources} weights > 0, one per comma-separated item of data.path")
    _require(d.val_path is None or d.source in ("files", "chat"), "data.val_path", d.val_path,
             "applies to data=text and data=chat; the default corpus is split by data.val_fraction")
    _require(0 <= d.max_bad_fraction < 1, "data.max_bad_fraction", d.max_bad_fraction, "must be in [0, 1)")
    _require(d.tokenizer_train_bytes >= 1, "data.tokenizer_train_bytes", d.tokenizer_train_bytes,
             "must be an integer >= 1")
    _require(d.max_bytes is None or d.max_bytes >= 1, "data.max_bytes", d.max_bytes,
             "must be an integer >= 1, or null (all of the corpus)")


# ---------------------------------------------------------------------------------------------
# Plain dicts <-> typed objects (what crosses the process boundary to workers is a dict).


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict, cls: type = TrainConfig) -> Any:
    """Rebuild nested dataclasses from a plain dict, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config keys for {cls.__name__}: {sorted(unknown)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = config_from_dict(value, hint)
        kwargs[key] = value
    return cls(**kwargs)


# Settings a run cannot change between invocations: its checkpoints hold tensors of these shapes
# and a data order that depends on them.
_RESUME_FIXED = ("model", "data.tokenizer", "data.vocab_size", "deepspeed.zero_stage", "trainer.seed")


def resume_conflict(saved: TrainConfig, current: TrainConfig) -> Optional[str]:
    """The first setting that differs from a checkpoint's and would break resuming it, or None."""
    for name in _RESUME_FIXED:
        old, new = _get(saved, name), _get(current, name)
        if dataclasses.is_dataclass(old):
            for f in dataclasses.fields(old):
                if getattr(old, f.name) != getattr(new, f.name):
                    return (f"{name}.{f.name}={getattr(new, f.name)!r} differs from the checkpoint's "
                            f"{getattr(old, f.name)!r}")
        elif old != new:
            return f"{name}={new!r} differs from the checkpoint's {old!r}"
    if sequence_length(saved) != sequence_length(current):
        return f"data.block_size={sequence_length(current)} differs from the checkpoint's {sequence_length(saved)}"
    return None
