"""Single-process training with AdamW: the baseline that `swarmtrain demo` runs.

Validation loss is the mean over domains of each domain's loss on fixed held-out batches, so a
large domain cannot hide a small one and curves from different evaluations are comparable.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from trainer.data import EMBEDDED_DOMAINS, DomainSplit, batches, load_domain, split_domain
from trainer.model import LM, ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "tiny"
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 20
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0
    seed: int = 0
    domains: tuple[str, ...] = EMBEDDED_DOMAINS  # embedded names or paths (see data.load_domain)
    val_fraction: float = 0.05
    eval_every: int = 50
    eval_batches: int = 4  # per domain
    log_every: int = 10
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's choice


@dataclass(frozen=True)
class TrainReport:
    step: int  # optimizer steps done so far
    train_loss: float | None  # mean over the steps since the previous report; None at step 0
    val_loss: float | None  # only on evaluation steps
    val_loss_by_domain: dict[str, float]
    tokens_per_s: float
    lr: float


@dataclass
class TrainResult:
    initial_val_loss: float
    final_val_loss: float
    history: list[TrainReport]
    model: LM


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # Decay matrices and embeddings only; decaying norm gains just fights the normalisation.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate(model: LM, val_sets: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, float]:
    was_training = model.training
    model.eval()
    losses = {}
    for name, fixed in val_sets.items():
        losses[name] = sum(model(x, y)[1].item() for x, y in fixed) / len(fixed)
    model.train(was_training)
    return losses


def _mixed_batches(splits: list[DomainSplit], cfg: TrainConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # Domains are mixed by size: windows are drawn from the concatenated training text.
    train = torch.cat([s.train for s in splits])
    return batches(train, cfg.batch_size, cfg.seq_len, seed=cfg.seed)


def _val_sets(splits: list[DomainSplit], cfg: TrainConfig) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    # Fixed batches, drawn once: every evaluation sees the same windows.
    sets = {}
    for i, s in enumerate(splits):
        stream = batches(s.val, cfg.batch_size, cfg.seq_len, seed=cfg.seed * 7919 + 1 + i)
        sets[s.name] = [next(stream) for _ in range(cfg.eval_batches)]
    return sets


def train_single_process(
    cfg: TrainConfig, on_report: Callable[[TrainReport], None] | None = None
) -> TrainResult:
    """Train one model on one process; deterministic for a fixed config (including num_threads)."""
    previous_threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _train(cfg, on_report)
    finally:
        torch.set_num_threads(previous_threads)


def _train(cfg: TrainConfig, on_report: Callable[[TrainReport], None] | None) -> TrainResult:
    model_cfg = ModelConfig.from_preset(cfg.preset)
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the {cfg.preset} preset's max_seq_len {model_cfg.max_seq_len}")
    splits = [split_domain(load_domain(d), cfg.val_fraction, seed=cfg.seed) for d in cfg.domains]
    train_stream = _mixed_batches(splits, cfg)
    val_sets = _val_sets(splits, cfg)

    model = LM(model_cfg, seed=cfg.seed)
    optimizer = make_optimizer(model, cfg)
    log.info(
        "training %s (%s params) on %s for %d steps",
        cfg.preset, f"{model.num_params():,}", ", ".join(s.name for s in splits), cfg.steps,
    )

    history: list[TrainReport] = []

    def report(step: int, train_loss: float | None, tokens_per_s: float, evaluated: bool) -> float | None:
        by_domain = evaluate(model, val_sets) if evaluated else {}
        val_loss = sum(by_domain.values()) / len(by_domain) if by_domain else None
        entry = TrainReport(step, train_loss, val_loss, by_domain, tokens_per_s, lr_at(max(step - 1, 0), cfg))
        history.append(entry)
        log.info(
            "step %d train %s val %s %.0f tok/s", step,
            "-" if train_loss is None else f"{train_loss:.4f}",
            "-" if val_loss is None else f"{val_loss:.4f}", tokens_per_s,
        )
        if on_report is not None:
            on_report(entry)
        return val_loss

    initial_val = report(0, None, 0.0, evaluated=True)
    assert initial_val is not None
    final_val = initial_val
    window_losses: list[float] = []
    window_start, window_tokens = time.perf_counter(), 0
    model.train()
    for step in range(1, cfg.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1, cfg)
        x, y = next(train_stream)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        window_losses.append(loss.item())
        window_tokens += x.numel()

        evaluated = step % cfg.eval_every == 0 or step == cfg.steps
        if evaluated or step % cfg.log_every == 0:
            tokens_per_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
            val = report(step, sum(window_losses) / len(window_losses), tokens_per_s, evaluated)
            final_val = final_val if val is None else val
            window_losses.clear()
            window_start, window_tokens = time.perf_counter(), 0
    return TrainResult(initial_val, final_val, history, model)
