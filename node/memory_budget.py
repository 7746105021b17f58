"""``--max-memory``: what a node's training state may take on its device, and how many activation
slots fit beside it. Pure arithmetic over the model's shape; docs/operations.md gives the formulas.

The budget covers the memory of the device the node trains on (host RAM with --device cpu, that
GPU's memory with cuda): the stage's weights, gradients and AdamW moments, one backward's working
memory, and the activations each in-flight microbatch holds from its forward to its backward. The
process's fixed overhead (Python, torch, hivemind: a few hundred MB of host RAM) is not in it.
"""
from __future__ import annotations

from dataclasses import dataclass

from node.config import format_size
from protocol.runspec import RunSpec
from trainer.model import ModelConfig, stage_block_ranges

FP32 = 4
# weights + gradients + AdamW's two moments, all fp32
TRAIN_STATE_BYTES_PER_PARAM = 4 * FP32


class MemoryBudgetError(ValueError):
    """The node's work does not fit in its budget; the message says how much it needs."""


@dataclass(frozen=True)
class StageMemory:
    stage: int
    params: int
    state_bytes: int  # weights, gradients, AdamW moments
    slot_bytes: int  # what one in-flight microbatch holds from its forward to its backward
    workspace_bytes: int  # one backward's activation gradients, about one slot

    def needed(self, slots: int) -> int:
        return self.state_bytes + self.workspace_bytes + slots * self.slot_bytes


def _block_activation_elements(cfg: ModelConfig) -> int:
    """Saved for backward per token by one block (norm inputs, q/k/v, attention output, the SwiGLU's
    three hidden tensors): ~12.2 d + 4 d_ff measured with saved-tensor hooks; 13 d rounds it up.
    No T x T term: scaled_dot_product_attention saves no attention matrix on the CPU or CUDA."""
    return 13 * cfg.d_model + 4 * cfg.d_ff


def stage_memory(spec: RunSpec, stage: int) -> StageMemory:
    cfg = ModelConfig.from_preset(spec.model.preset)
    pipe = spec.pipeline
    blocks = len(stage_block_ranges(cfg.n_layers, pipe.stages, pipe.blocks_per_stage)[stage])
    params = blocks * cfg.block_param_count()
    per_token = blocks * _block_activation_elements(cfg) + 2 * cfg.d_model  # + the hop's input and output
    if stage == 0:
        params += cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2) + cfg.d_model
        per_token += cfg.vocab_size + 4 * cfg.d_model  # final norm, logits, loss
    tokens = pipe.microbatch_size * spec.model.seq_len
    slot = FP32 * tokens * per_token
    return StageMemory(stage, params, TRAIN_STATE_BYTES_PER_PARAM * params, slot, slot)


def replica_memory(spec: RunSpec) -> int:
    """Mode zo: the fp32 replica and one probe's forward (no gradients, no optimizer state)."""
    cfg = ModelConfig.from_preset(spec.model.preset)
    tokens = spec.train.batch_size * spec.model.seq_len
    forward = FP32 * tokens * (2 * cfg.vocab_size + 4 * cfg.d_model + 3 * cfg.d_ff)
    return FP32 * cfg.param_count() + forward


def fit_slots(need: StageMemory, budget: int, wanted: int) -> int:
    """Activation slots that fit beside the stage's state: at most ``wanted`` (pipeline.memory), at
    least 1, else MemoryBudgetError."""
    room = budget - need.state_bytes - need.workspace_bytes
    slots = min(wanted, room // need.slot_bytes if room > 0 else 0)
    if slots < 1:
        raise MemoryBudgetError(
            f"--max-memory {format_size(budget)} is too small for stage {need.stage}: its weights, gradients and "
            f"AdamW state take {format_size(need.state_bytes)} and one microbatch's activations "
            f"{format_size(need.slot_bytes)} (plus as much to run its backward); give at least "
            f"{format_size(need.needed(1))}")
    return int(slots)


def check_budget(spec: RunSpec, budget: int, stage: int | None, spare: bool = False) -> int | None:
    """Before the node joins: refuse work that cannot fit. ``stage`` None = any stage the node may
    be given (role auto: any; a spare: any but 0). Returns the fewest activation slots among those
    stages (pipeline mode), else None."""
    if spec.run.mode == "zo":
        need = replica_memory(spec)
        if need > budget:
            raise MemoryBudgetError(f"--max-memory {format_size(budget)} is too small for this run's "
                                    f"{spec.model.preset} replica: it needs {format_size(need)}")
        return None
    if spec.run.mode != "pipeline":
        return None
    if stage is not None:
        stages = [stage]
    else:  # a spare never takes stage 0: a new data node copies a live one, it is never lost to spares
        stages = range(1 if spare else 0, spec.pipeline.stages)
    return min(fit_slots(stage_memory(spec, s), budget, spec.pipeline.memory) for s in stages)


def cap_cuda(device: str, budget: int) -> float | None:
    """On a CUDA device the allocator enforces the budget too: past it, allocations raise out-of-memory
    instead of taking the GPU from other processes. Returns the fraction set (None on the CPU)."""
    if not device.startswith("cuda"):
        return None
    import torch

    index = torch.device(device).index or 0
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = min(1.0, budget / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction
