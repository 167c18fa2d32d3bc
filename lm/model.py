"""A decoder-only Transformer in one file, in two flavours chosen by `ModelConfig.variant`:

- gpt2:  learned positions, LayerNorm, GELU MLP (the GPT-2 architecture)
- llama: rotary positions (RoPE), RMSNorm, SwiGLU MLP, no biases (the Llama architecture)

Attention goes through `F.scaled_dot_product_attention`, except where a written-out form is faster:
training on CPU at short sequences (`causal_attention`) and a compiled decode step's one query
(`one_query_attention`, which Inductor fuses); the output head is tied to the token
embedding (or is its own matrix, as in Llama 2/3) and, in training, computes the loss a chunk of
tokens at a time (lm.head_loss). The parameter count and FLOPs per token (for MFU) sit beside the
model they describe.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lm.config import ModelConfig, RopeScalingConfig, has_qkv_bias, kv_heads, mlp_hidden_size
from lm.head_loss import IGNORE_INDEX, OutputHead


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.variant == "llama":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(head_dim: int, length: int, theta: float,
                scaling: RopeScalingConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (length, head_dim/2) for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is not None and scaling.type != "none":
        inv_freq = scaled_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def scaled_frequencies(inv_freq: torch.Tensor, scaling: RopeScalingConfig) -> torch.Tensor:
    """RoPE frequencies for a longer context, as Hugging Face computes them, so such models port:
    "linear" divides every one by the factor; "llama3" (Llama 3.1) divides those whose wavelength
    exceeds the pretraining context / low_freq_factor, keeps those under context / high_freq_factor,
    and blends the band between."""
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    context, low, high = scaling.original_max_position_embeddings, scaling.low_freq_factor, scaling.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / scaling.factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    in_band = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(in_band, blended, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by position; halves layout (as Hugging Face's Llama), so weights port.
    cos/sin are (T, D/2) shared by the batch, or (B, T, D/2) when sequences sit at other positions."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = (cos[None, None], sin[None, None]) if cos.dim() == 2 else (cos[:, None], sin[:, None])
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.type_as(x)


def one_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA for one query per sequence, (B, H, 1, D) over (B, H_kv, L, D), written as multiply-and-sum.
    Compiled decode steps use it: Inductor fuses it into a few loops over the cache, 2-4x faster
    than the SDPA kernel, whose per-head GEMM calls cost more than this arithmetic (RESULTS.md).
    Eager keeps SDPA, which is faster there than these unfused ops. With grouped-query attention
    (H_kv < H) each key/value head serves H / H_kv consecutive query heads, read once for all."""
    B, H, _, D = q.shape
    groups = q.float().reshape(B, keys.shape[1], H // keys.shape[1], 1, D)  # query heads by shared key/value head
    scores = (groups * keys.float()[:, :, None]).sum(-1) * (D ** -0.5)  # (B, H_kv, H / H_kv, L), in fp32 as SDPA
    if mask is not None:  # (B, 1, 1, L), True where a key may be seen
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(-1)
    return (weights[..., None] * values.float()[:, :, None]).sum(-2).reshape(B, H, 1, D).to(q.dtype)


EXPLICIT_ATTENTION_MAX_LEN = 256


def causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal SDPA of (B, H, T, D) queries over (B, H_kv, T, D) keys and values (H_kv < H: grouped-query
    attention, each key/value head serving H / H_kv consecutive query heads). In training on CPU, up to
    EXPLICIT_ATTENTION_MAX_LEN positions, it is written out: one batched matmul for the scores with the
    causal mask added in the same call, a softmax, and one for the weighted sum. There PyTorch's CPU
    flash kernel spends its backward on small blocks, not arithmetic: the written-out forward+backward
    is ~1.5x faster in fp32 at T=64 and ~2x in bf16 at T=256 (RESULTS.md). Forward alone (evaluation,
    prefill) it is no faster in fp32, and its (T, T) scores per head grow with T squared, so inference,
    longer sequences and GPUs keep the flash kernel. In bf16 the scores are bf16, as in nanoGPT's
    attention under autocast. A group's query heads are stacked as more rows of one matmul, so keys
    and values are never copied per query head."""
    B, H, T, D = q.shape
    H_kv = keys.shape[1]
    training = torch.is_grad_enabled() and q.requires_grad
    if not training or q.device.type != "cpu" or T > EXPLICIT_ATTENTION_MAX_LEN:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True, dropout_p=dropout_p,
                                              enable_gqa=H_kv != H)
    mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1).repeat(H // H_kv, 1)
    scores = torch.baddbmm(mask, q.reshape(B * H_kv, H // H_kv * T, D),
                           keys.reshape(B * H_kv, T, D).transpose(1, 2), alpha=D ** -0.5)
    weights = F.dropout(scores.softmax(-1), dropout_p) if dropout_p > 0 else scores.softmax(-1)
    return torch.bmm(weights, values.reshape(B * H_kv, T, D)).view(B, H, T, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, kv_heads(cfg)
        self.head_dim = cfg.n_embd // cfg.n_head
        kv_width = self.n_kv_head * self.head_dim
        self.qkv_widths = (cfg.n_embd, kv_width, kv_width)
        self.c_attn = nn.Linear(cfg.n_embd, sum(self.qkv_widths), bias=has_qkv_bias(cfg))  # fused q, k, v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def _qkv(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, D), keys and values (B, H_kv, T, D), rotated when there is a RoPE table."""
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.qkv_widths, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self._qkv(x, rope)
        y = causal_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    # KV-cache paths for serving. Caches are (slots, n_kv_head, max_len, head_dim); the engine keeps
    # its running sequences in slots 0..B-1, so decoding reads them as one view, without a gather.

    def prefill(self, x: torch.Tensor, rope, k_cache: torch.Tensor, v_cache: torch.Tensor,
                slots: slice | torch.Tensor, start: int = 0) -> torch.Tensor:
        """Prompts (B, T, C) from position `start`, right-padded to T: causal attention over
        themselves and the `start` keys already in their slots (a cached prefix or an earlier chunk;
        padding comes after every real token, so it is never attended), keys stored in `slots`."""
        B, T, C = x.shape
        q, k, v = self._qkv(x, rope)
        k_cache[slots, :, start:start + T] = k
        v_cache[slots, :, start:start + T] = v
        gqa = self.n_kv_head != self.n_head
        if start:
            seen = torch.arange(start + T, device=x.device) <= start + torch.arange(T, device=x.device)[:, None]
            y = F.scaled_dot_product_attention(q, k_cache[slots, :, :start + T], v_cache[slots, :, :start + T],
                                               attn_mask=seen, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    def decode(self, x: torch.Tensor, rope, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
               positions: torch.Tensor, length: int, mask: torch.Tensor | None) -> torch.Tensor:
        """One new token (B, 1, C) for the sequences in slots 0..B-1, token b at positions[b]."""
        B, _, C = x.shape
        q, k, v = self._qkv(x, rope)
        k_cache[rows, :, positions] = k[:, :, 0]
        v_cache[rows, :, positions] = v[:, :, 0]
        keys, values = k_cache[:B, :, :length], v_cache[:B, :, :length]
        if torch.compiler.is_compiling():
            y = one_query_attention(q, keys, values, mask)
        else:  # a group's query heads as that key/value head's queries: no copy of the cache per head
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv_head, -1, self.head_dim), keys, values,
                                               attn_mask=mask)
        return self.c_proj(y.reshape(B, 1, C))


class MLP(nn.Module):
    """GELU MLP (gpt2) or SwiGLU with the gate and up projections fused in one matmul (llama)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = mlp_hidden_size(cfg)
        self.swiglu = cfg.variant == "llama"
        self.gelu_approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate=self.gelu_approximate)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = _norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope)
        return x + self.mlp(self.ln_2(x))

    def prefill(self, x, rope, k_cache, v_cache, slots, start=0) -> torch.Tensor:
        x = x + self.attn.prefill(self.ln_1(x), rope, k_cache, v_cache, slots, start)
        return x + self.mlp(self.ln_2(x))

    def decode(self, x, rope, k_cache, v_cache, rows, positions, length, mask) -> torch.Tensor:
        x = x + self.attn.decode(self.ln_1(x), rope, k_cache, v_cache, rows, positions, length, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.vocab_size:
            raise ValueError("model.vocab_size must be set (it comes from the tokenizer)")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.variant == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = _norm(cfg)
        self.lm_head = OutputHead(cfg.n_embd, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # tied: one matrix embeds and un-embeds
        if cfg.variant == "llama":
            cos, sin = rope_tables(cfg.n_embd // cfg.n_head, cfg.block_size, cfg.rope_theta, cfg.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits (B, T, vocab) and, given targets, the mean cross-entropy (-100 targets are ignored).
        In training mode with targets, the logits are None: the loss is computed a chunk at a time
        without them (lm.head_loss), as Hugging Face models do with a fused loss."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds model.block_size={self.cfg.block_size}")
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        else:
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        x = self.drop(x)
        for block in self.h:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        x = self.ln_f(x)
        if self.training and targets is not None:
            return None, self.lm_head(x, targets)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            # Mean over counted targets; a batch whose targets are all masked gives 0, not NaN.
            counted = (targets != IGNORE_INDEX).sum().clamp(min=1)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum") / counted
        return logits, loss

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, lengths: list[int], slots: list[int], k_caches: list[torch.Tensor],
                v_caches: list[torch.Tensor], start: int = 0) -> torch.Tensor:
        """Next-token logits (B, vocab) after B prompts (or chunks of them) in one forward: ids (B, T)
        right-padded, row b of lengths[b] tokens after the `start` tokens whose keys and values its
        cache slot, slots[b], holds already; caches filled in those slots (one pair per layer)."""
        B, T = ids.shape
        consecutive = slots == list(range(slots[0], slots[0] + B))
        slots = slice(slots[0], slots[0] + B) if consecutive else torch.tensor(slots, device=ids.device)
        end = start + T
        if end > self.cfg.block_size:
            raise ValueError(f"sequence length {end} exceeds model.block_size={self.cfg.block_size}")
        x = self.wte(ids)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe.weight[start:end]
        else:
            rope = (self.rope_cos[start:end], self.rope_sin[start:end])
        for block, k_cache, v_cache in zip(self.h, k_caches, v_caches):
            x = block.prefill(x, rope, k_cache, v_cache, slots, start)
        last = x[torch.arange(B, device=ids.device), torch.tensor(lengths, device=ids.device) - 1]
        return self.lm_head(self.ln_f(last)).float()

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, positions: list[int], k_caches: list[torch.Tensor],
               v_caches: list[torch.Tensor]) -> torch.Tensor:
        """Next-token logits (B, vocab) after one token per sequence; sequence b sits in cache slot b
        with positions[b] tokens before this one."""
        length = max(positions) + 1
        if length > self.cfg.block_size:
            raise ValueError(f"sequence length {length} exceeds model.block_size={self.cfg.block_size}")
        pos = torch.tensor(positions, device=ids.device)
        # Several sequences always attend through the mask, even at one position: a compiled step then
        # has one program for every batch of two or more, and the mask costs nothing measurable.
        return self.decode_step(ids, pos, length, len(positions) > 1, k_caches, v_caches)

    @torch.no_grad()
    def decode_step(self, ids: torch.Tensor, pos: torch.Tensor, length: int, masked: bool,
                    k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> torch.Tensor:
        """`decode` on tensors only (what the engine compiles): `length` is the longest sequence's
        length with this token; `masked`: a mask hides the keys past each sequence's position (needed
        when some are shorter). Masks and position tables are built once per step."""
        B = ids.numel()
        x = self.wte(ids)[:, None]
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)[:, None]
        else:
            rope = (self.rope_cos[pos][:, None], self.rope_sin[pos][:, None])  # (B, 1, D/2)
        mask = None  # one sequence sees every cached key
        if masked:
            mask = (torch.arange(length, device=ids.device) <= pos[:, None])[:, None, None]  # (B, 1, 1, length)
        rows = torch.arange(B, device=ids.device)
        for block, k_cache, v_cache in zip(self.h, k_caches, v_caches):
            x = block.decode(x, rope, k_cache, v_cache, rows, pos, length, mask)
        return self.lm_head(self.ln_f(x[:, 0])).float()

    def num_params(self, non_embedding: bool = True, numel=torch.Tensor.numel) -> int:
        """Parameters counted once (the tied head is the embedding); positions excluded if asked.
        `numel` sizes one parameter (a sharded one may keep its full size elsewhere)."""
        n = sum(numel(p) for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= numel(self.wpe.weight)
        return n

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Plain sampling without a KV cache: a quick look at a model, not the serving engine."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.cfg.block_size:]
            logits, _ = self(context)
            logits = logits[:, -1, :].float()
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits[logits < kth] = -float("inf")
                next_id = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


def flops_per_token(cfg: ModelConfig, seq_len: int, num_params: int) -> float:
    """Training FLOPs per token: 6N for the weights plus the attention scores (PaLM appendix B)."""
    head_dim = cfg.n_embd // cfg.n_head
    return 6.0 * num_params + 12.0 * cfg.n_layer * cfg.n_head * head_dim * seq_len
