"""One expert's model and optimizer: local steps, and its whole state as named tensors (a checkpoint).

A checkpoint holds the weights (``w/<name>``), the AdamW state (``o/<name>/<key>``) and what makes
it self-describing (``meta/job``: the job name as bytes, ``meta/step``, ``meta/samples``), so its
content hash covers where it is in training too.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ensemble.jobs import ExpertJob
from trainer.model import LM
from trainer.train import TrainConfig, lr_at, make_optimizer

GRAD_CLIP = 1.0


class CheckpointMismatch(ValueError):
    """A checkpoint that belongs to another job or does not fit the job's model."""


def train_config(job: ExpertJob) -> TrainConfig:
    """The job's schedule: linear warmup over a tenth of its steps (at most 20), then cosine decay."""
    return TrainConfig(lr=job.lr, steps=job.steps, warmup=max(1, min(20, job.steps // 10)))


class ExpertTrainer:
    def __init__(self, job: ExpertJob, seed: int, device: str = "cpu"):
        self.job = job
        self.device = device
        self.model = LM(job.model, seed=seed).to(device)
        self.schedule = train_config(job)
        self.optimizer = make_optimizer(self.model, self.schedule)
        self.step = 0
        self.samples = 0  # sequences trained on so far, by every node that trained this job
        self.last_loss = float("nan")

    def train_steps(self, count: int, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """``count`` optimizer steps (never past the job's end); the mean training loss."""
        self.model.train()
        losses = []
        for _ in range(min(count, self.job.steps - self.step)):
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.step, self.schedule)
            x, y = next(batches)
            x, y = x.to(self.device), y.to(self.device)
            _, loss = self.model(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
            self.optimizer.step()
            self.step += 1
            self.samples += len(x)
            losses.append(loss.item())
        if losses:
            self.last_loss = sum(losses) / len(losses)
        return self.last_loss

    @property
    def done(self) -> bool:
        return self.step >= self.job.steps

    # ---- state -------------------------------------------------------------------------------

    def averaged_tensors(self) -> dict[str, torch.Tensor]:
        """What a group averages: the weights and the optimizer's moments (not its step counts)."""
        state = self.state()
        return {name: t for name, t in state.items()
                if name.startswith("w/") or (name.startswith("o/") and not name.endswith("/step"))}

    def load_averaged(self, tensors: dict[str, torch.Tensor]) -> None:
        state = self.state()
        state.update({name: t.to(state[name].dtype) for name, t in tensors.items() if name in state})
        self.load(state)

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"w/{name}": t.detach().to("cpu", copy=True) for name, t in self.model.state_dict().items()}
        index = {id(p): name for name, p in self.model.named_parameters()}
        for p, state in self.optimizer.state.items():
            for key, value in state.items():
                out[f"o/{index[id(p)]}/{key}"] = torch.as_tensor(value).detach().to("cpu", copy=True)
        out["meta/job"] = torch.frombuffer(bytearray(self.job.name.encode()), dtype=torch.uint8).clone()
        out["meta/step"] = torch.tensor([self.step], dtype=torch.int64)
        out["meta/samples"] = torch.tensor([self.samples], dtype=torch.int64)
        return out

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Take a checkpoint of this job (weights, optimizer state, step); raises CheckpointMismatch."""
        job, step, samples = checkpoint_meta(state)
        if job != self.job.name:
            raise CheckpointMismatch(f"the checkpoint is of job {job!r}, not {self.job.name!r}")
        if not 0 <= step <= self.job.steps:
            raise CheckpointMismatch(f"the checkpoint is at step {step}, outside 0..{self.job.steps}")
        weights = {name[2:]: t for name, t in state.items() if name.startswith("w/")}
        try:
            self.model.load_state_dict(weights)  # strict: names and shapes must match
        except RuntimeError as error:
            raise CheckpointMismatch(" ".join(str(error).split())[:300]) from None
        params = dict(self.model.named_parameters())
        self.optimizer.state.clear()
        for name, t in state.items():
            if name.startswith("o/"):
                param, _, key = name[2:].rpartition("/")
                if param not in params or (key != "step" and t.shape != params[param].shape):
                    raise CheckpointMismatch(f"optimizer state {name} does not fit the model")
                # AdamW keeps its step count on the CPU and its moments beside the parameter
                self.optimizer.state[params[param]][key] = t.clone() if key == "step" else t.to(self.device)
        self.step, self.samples = step, samples


def checkpoint_meta(state: dict[str, torch.Tensor]) -> tuple[str, int, int]:
    """(job name, step, samples) of a checkpoint; CheckpointMismatch when they are missing or malformed."""
    job, step, samples = state.get("meta/job"), state.get("meta/step"), state.get("meta/samples")
    if job is None or job.dtype != torch.uint8 or job.dim() != 1 or job.numel() > 256:
        raise CheckpointMismatch("the checkpoint names no job (meta/job)")
    for name, t in (("meta/step", step), ("meta/samples", samples)):
        if t is None or t.dtype != torch.int64 or t.numel() != 1 or int(t) < 0:
            raise CheckpointMismatch(f"the checkpoint has no valid {name}")
    try:
        name = bytes(job.tolist()).decode()
    except UnicodeDecodeError:
        raise CheckpointMismatch("the checkpoint's job name is not text") from None
    return name, int(step), int(samples)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))
