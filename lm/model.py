"""A decoder-only Transformer in one file, in two flavours chosen by `ModelConfig.variant`:

- gpt2:  learned positions, LayerNorm, GELU MLP (the GPT-2 architecture)
- llama: rotary positions (RoPE), RMSNorm, SwiGLU MLP, no biases (the Llama architecture)

Attention goes through `F.scaled_dot_product_attention`; the output head is tied to the token
embedding (or is its own matrix, as in Llama 2/3). The parameter count and FLOPs per token (for
MFU) sit beside the model they describe.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lm.config import ModelConfig, mlp_hidden_size


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.variant == "llama":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (length, head_dim/2) for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by position; halves layout (as Hugging Face's Llama), so weights port.
    cos/sin are (T, D/2) shared by the batch, or (B, T, D/2) when sequences sit at other positions."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = (cos[None, None], sin[None, None]) if cos.dim() == 2 else (cos[:, None], sin[:, None])
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.use_rope = cfg.variant == "llama"
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.use_rope:
            cos, sin = rope
            q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def forward_cached(self, x: torch.Tensor, rope, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Attention for T new tokens of B sequences, sequence b starting at positions[b], with the
        keys and values of earlier tokens read from (and the new ones written to) cache rows `slots`.
        Caches are (slots, max_len, n_head, head_dim)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim) for t in (q, k, v))
        pos = positions[:, None] + torch.arange(T, device=x.device)  # (B, T)
        if self.use_rope:
            cos, sin = rope
            q = apply_rope(q.transpose(1, 2), cos[pos], sin[pos]).transpose(1, 2)
            k = apply_rope(k.transpose(1, 2), cos[pos], sin[pos]).transpose(1, 2)
        k_cache[slots[:, None], pos] = k.to(k_cache.dtype)
        v_cache[slots[:, None], pos] = v.to(v_cache.dtype)
        length = int(pos.max()) + 1
        keys = k_cache[slots, :length].transpose(1, 2)  # (B, H, length, D)
        values = v_cache[slots, :length].transpose(1, 2)
        visible = torch.arange(length, device=x.device)[None, None, :] <= pos[:, :, None]  # (B, T, length)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=visible[:, None])
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """GELU MLP (gpt2) or SwiGLU with the gate and up projections fused in one matmul (llama)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = mlp_hidden_size(cfg)
        self.swiglu = cfg.variant == "llama"
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
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

    def forward_cached(self, x, rope, k_cache, v_cache, slots, positions) -> torch.Tensor:
        x = x + self.attn.forward_cached(self.ln_1(x), rope, k_cache, v_cache, slots, positions)
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
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # tied: one matrix embeds and un-embeds
        if cfg.variant == "llama":
            cos, sin = rope_tables(cfg.n_embd // cfg.n_head, cfg.block_size, cfg.rope_theta)
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
        """Logits (B, T, vocab) and, given targets, the mean cross-entropy (-100 targets are ignored)."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds model.block_size={self.cfg.block_size}")
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        else:
            rope = (self.rope_cos, self.rope_sin)
        x = self.drop(x)
        for block in self.h:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            # Mean over counted targets; a batch whose targets are all masked gives 0, not NaN.
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-100, reduction="sum") / (targets != -100).sum().clamp(min=1)
        return logits, loss

    @torch.no_grad()
    def forward_cached(self, idx: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> torch.Tensor:
        """Next-token logits (B, vocab) after T new tokens per sequence, using and filling the KV
        caches (one pair per layer): prefill is T = prompt length, decoding is T = 1."""
        B, T = idx.shape
        if int(positions.max()) + T > self.cfg.block_size:
            raise ValueError(f"sequence length exceeds model.block_size={self.cfg.block_size}")
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(positions[:, None] + torch.arange(T, device=idx.device))
        else:
            rope = (self.rope_cos, self.rope_sin)
        for block, k_cache, v_cache in zip(self.h, k_caches, v_caches):
            x = block.forward_cached(x, rope, k_cache, v_cache, slots, positions)
        return self.lm_head(self.ln_f(x[:, -1])).float()

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters counted once (the tied head is the embedding); positions excluded if asked."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
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
