"""A decoder-only language model that splits into pipeline stages.

The model reads top to bottom like nanoGPT: RMSNorm, rotary position embeddings, causal
self-attention, a SwiGLU MLP, pre-norm residual blocks and the LM itself. Stage splitting comes
last: stage 0 holds the embedding, its own first blocks, the final norm, the head and the loss;
stages 1..S-1 hold contiguous groups of blocks. Skipping a stage is identity on the residual
stream, so any path through the stages is a valid forward pass.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the model. Defaults are the `tiny` preset."""

    vocab_size: int = 256  # the byte tokenizer
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 192  # hidden width of the SwiGLU MLP
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("rotary embeddings need an even head dimension")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return replace(PRESETS[name], **overrides)

    def block_param_count(self) -> int:
        d = self.d_model
        return 4 * d * d + 3 * d * self.d_ff + 2 * d  # attention, SwiGLU, two norms

    def param_count(self) -> int:
        """Exact number of parameters of `LM(self)`, from arithmetic alone (no allocation)."""
        embed = self.vocab_size * self.d_model
        head = 0 if self.tie_embeddings else embed
        return embed + self.n_layers * self.block_param_count() + self.d_model + head


# GPT-2/3 widths and depths. With a 256-byte vocabulary the embedding is tiny, so the SwiGLU
# width is chosen to bring the total near the name. Exact counts (ModelConfig.param_count):
#   tiny 229,952 | small 25,829,888 | 124m 124,078,848 | 350m 346,342,400 | 1.3b 1,309,247,488
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(d_model=64, n_layers=4, n_heads=4, d_ff=192, max_seq_len=256),
    "small": ModelConfig(d_model=512, n_layers=8, n_heads=8, d_ff=1408, max_seq_len=512),
    "124m": ModelConfig(d_model=768, n_layers=12, n_heads=12, d_ff=3456, max_seq_len=1024),
    "350m": ModelConfig(d_model=1024, n_layers=24, n_heads=16, d_ff=3328, max_seq_len=1024),
    "1.3b": ModelConfig(d_model=2048, n_layers=24, n_heads=16, d_ff=6144, max_seq_len=2048),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16 activations do not lose the small-variance directions.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(seq_len: int, cfg: ModelConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, shape (seq_len, head_dim).

    Recomputed per forward (it is tiny) rather than kept as a buffer, so stage state dicts hold
    only weights and every stage computes bit-identical tables.
    """
    half = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta**half
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


# ---------------------------------------------------------------------------------------------
# Initialisation. Every part of the model (the embedding, the head, each block by its global
# index) draws from its own CPU stream derived from one seed, so a node that builds stage 3 alone
# gets exactly the weights that stage 3 has inside the whole model, on any device.

_EMBED_PART, _HEAD_PART = -1, -2


def _draw_seed(seed: int | None) -> int:
    # Without an explicit seed, draw one from torch's global RNG: torch.manual_seed decides it.
    return int(torch.randint(0, 2**62, (1,), device="cpu").item()) if seed is None else seed


def _part_generator(seed: int, part: int) -> torch.Generator:
    digest = hashlib.blake2b(struct.pack("<qq", seed, part), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _normal_(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    if not t.is_meta:  # meta tensors (counting, shape checks) have nothing to fill
        with torch.no_grad():
            t.copy_(torch.empty(t.shape, device="cpu").normal_(0.0, std, generator=gen))


def _init_block(block: Block, cfg: ModelConfig, seed: int, index: int) -> None:
    gen = _part_generator(seed, index)
    # GPT-2: residual output projections scaled down by depth so the stream's variance stays put.
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    for linear, std in ((block.attn.qkv, 0.02), (block.attn.proj, resid_std), (block.mlp.gate, 0.02),
                        (block.mlp.up, 0.02), (block.mlp.down, resid_std)):
        _normal_(linear.weight, std, gen)


def _build_blocks(cfg: ModelConfig, blocks: range, seed: int) -> nn.ModuleList:
    out = nn.ModuleList()
    for index in blocks:
        block = Block(cfg)
        _init_block(block, cfg, seed, index)
        out.append(block)
    return out


def _build_embedding_and_head(cfg: ModelConfig, seed: int) -> tuple[nn.Embedding, nn.Linear | None]:
    # A tied head is the embedding matrix itself, not a second module: state dicts then hold no
    # shared tensors, which safetensors refuses to save.
    tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
    _normal_(tok_emb.weight, 0.02, _part_generator(seed, _EMBED_PART))
    if cfg.tie_embeddings:
        return tok_emb, None
    head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
    _normal_(head.weight, 0.02, _part_generator(seed, _HEAD_PART))
    return tok_emb, head


def _check_tokens(tokens: torch.Tensor, cfg: ModelConfig) -> None:
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape (batch, seq_len), got {tuple(tokens.shape)}")
    if tokens.shape[1] > cfg.max_seq_len:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len {cfg.max_seq_len}")


class LM(nn.Module):
    """The whole model in one module."""

    def __init__(self, cfg: ModelConfig, seed: int | None = None) -> None:
        super().__init__()
        seed = _draw_seed(seed)
        self.cfg = cfg
        self.tok_emb, self.head = _build_embedding_and_head(cfg, seed)
        self.blocks = _build_blocks(cfg, range(cfg.n_layers), seed)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        _check_tokens(tokens, self.cfg)
        cos, sin = rope_tables(tokens.shape[1], self.cfg, tokens.device)
        x = self.tok_emb(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        return _logits_and_loss(self.norm(x), self.tok_emb, self.head, targets)

    @torch.no_grad()
    def generate(
        self, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 0.8, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Sample a continuation of ``tokens`` (batch, time), cropping the context to max_seq_len."""
        for _ in range(max_new_tokens):
            context = tokens[:, -self.cfg.max_seq_len :]
            logits = self(context)[:, -1, :] / max(temperature, 1e-5)
            probs = torch.softmax(logits, dim=-1)
            tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return tokens


def _logits_and_loss(
    x: torch.Tensor, tok_emb: nn.Embedding, head: nn.Linear | None, targets: torch.Tensor | None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(x, tok_emb.weight if head is None else head.weight)
    if targets is None:
        return logits
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
    return logits, loss


# ---------------------------------------------------------------------------------------------
# Stages. Block indices inside a stage are local (blocks.0, blocks.1, ...), so stages of equal
# size have identical state-dict keys: a lost stage can be rebuilt from its neighbours' weights.


def stage_block_ranges(
    n_layers: int, num_stages: int, blocks_per_stage: Sequence[int] | None = None
) -> list[range]:
    """Global block indices held by each stage.

    Default: as even as possible; when it does not divide, the later stages take the extra
    blocks because stage 0 already carries the embedding, head and loss.
    """
    if num_stages < 1:
        raise ValueError(f"num_stages must be at least 1, got {num_stages}")
    if blocks_per_stage is None:
        base, extra = divmod(n_layers, num_stages)
        counts = [base + (1 if s >= num_stages - extra else 0) for s in range(num_stages)]
    else:
        counts = list(blocks_per_stage)
        if len(counts) != num_stages:
            raise ValueError(f"blocks_per_stage has {len(counts)} entries for {num_stages} stages")
        if sum(counts) != n_layers:
            raise ValueError(f"blocks_per_stage sums to {sum(counts)}, the model has {n_layers} blocks")
        if counts[0] < 0:
            raise ValueError("stage 0 cannot hold a negative number of blocks")
    if any(c < 1 for c in counts[1:]):
        raise ValueError(f"every stage after 0 needs at least one block, got {counts}")
    starts = [sum(counts[:s]) for s in range(num_stages)]
    return [range(start, start + count) for start, count in zip(starts, counts)]


class Stage0(nn.Module):
    """Embedding, the first blocks, final norm, head and loss: what a data node holds."""

    def __init__(self, cfg: ModelConfig, blocks: range, seed: int | None = None) -> None:
        super().__init__()
        seed = _draw_seed(seed)
        self.cfg = cfg
        self.block_range = blocks
        self.tok_emb, self.head = _build_embedding_and_head(cfg, seed)
        self.blocks = _build_blocks(cfg, blocks, seed)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def start(self, tokens: torch.Tensor) -> torch.Tensor:
        """Beginning of every path: embed the tokens and run stage 0's own blocks."""
        _check_tokens(tokens, self.cfg)
        cos, sin = rope_tables(tokens.shape[1], self.cfg, tokens.device)
        x = self.tok_emb(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        return x

    def finish(
        self, x: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """End of every path: final norm, head, and the loss when targets are given."""
        return _logits_and_loss(self.norm(x), self.tok_emb, self.head, targets)

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The path that skips every other stage."""
        return self.finish(self.start(tokens), targets)


class BlockStage(nn.Module):
    """A contiguous group of residual blocks: stages 1..S-1."""

    def __init__(self, cfg: ModelConfig, blocks: range, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.block_range = blocks
        self.blocks = _build_blocks(cfg, blocks, _draw_seed(seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_tables(x.shape[1], self.cfg, x.device)
        for block in self.blocks:
            x = block(x, cos, sin)
        return x


def build_stage(cfg: ModelConfig, stage: int, blocks: range, seed: int | None = None) -> Stage0 | BlockStage:
    """One stage alone, without building the rest of the model."""
    return Stage0(cfg, blocks, seed) if stage == 0 else BlockStage(cfg, blocks, seed)


def split_model(
    model: LM, num_stages: int, blocks_per_stage: Sequence[int] | None = None
) -> list[Stage0 | BlockStage]:
    """Cut an LM into stages that share its parameters (no copy; training one trains the other)."""
    cfg = model.cfg
    ranges = stage_block_ranges(cfg.n_layers, num_stages, blocks_per_stage)
    with torch.device("meta"):  # the shells' own weights are replaced right below
        stages = [build_stage(cfg, s, r, seed=0) for s, r in enumerate(ranges)]
    for stage, r in zip(stages, ranges):
        stage.blocks = nn.ModuleList(model.blocks[i] for i in r)
    stages[0].tok_emb, stages[0].norm, stages[0].head = model.tok_emb, model.norm, model.head
    return stages


def validate_order(order: Sequence[int], num_stages: int) -> None:
    """Raise ValueError unless `order` lists distinct stages from 1..num_stages-1."""
    seen: set[int] = set()
    for s in order:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ValueError(f"stage ids must be ints, got {s!r} in {list(order)}")
        if s == 0:
            raise ValueError("stage 0 starts and ends every path; do not list it in the order")
        if not 1 <= s < num_stages:
            raise ValueError(f"unknown stage {s} in {list(order)}; stages are 1..{num_stages - 1}")
        if s in seen:
            raise ValueError(f"stage {s} appears twice in {list(order)}")
        seen.add(s)


def forward_path(
    stages: Sequence[Stage0 | BlockStage],
    tokens: torch.Tensor,
    order: Sequence[int],
    targets: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run one path: stage 0's start, the stages in `order`, stage 0's finish."""
    validate_order(order, len(stages))
    x = stages[0].start(tokens)
    for s in order:
        x = stages[s](x)
    return stages[0].finish(x, targets)
