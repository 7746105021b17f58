"""The expert jobs of a run: one per domain and ensemble, and the dense model, from the run spec."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from protocol.runspec import DENSE_DOMAIN, ExpertSpec, RunSpec
from trainer.model import PRESETS, ModelConfig

HETEROGENEOUS, HOMOGENEOUS, DENSE = "heterogeneous", "homogeneous", "dense"
ENSEMBLES = (HETEROGENEOUS, HOMOGENEOUS)
PREFIX = {HETEROGENEOUS: "het", HOMOGENEOUS: "hom"}
MAX_LABEL = 48
_UNSAFE = re.compile(r"[^a-z0-9._-]+")


class JobError(ValueError):
    """A run's expert jobs cannot be built: no plan in the spec, or a shape that does not fit."""


@dataclass(frozen=True)
class ExpertJob:
    index: int  # position in the run's job list, the same on every node
    name: str  # het.<domain>, hom.<domain> or dense: announced by the node that trains it
    ensemble: str  # heterogeneous, homogeneous or dense
    domains: tuple[str, ...]  # data sources it trains on (data.domains entries)
    model: ModelConfig
    steps: int
    lr: float

    @property
    def data_key(self) -> str:
        """What seeds its initial weights and batches: its domains, so that the heterogeneous and the
        homogeneous expert of a domain start alike and see the same windows (a paired comparison)."""
        return "\0".join(self.domains)

    @property
    def params(self) -> int:
        return self.model.param_count()

    @property
    def compute(self) -> int:
        """Parameters x steps: the unit of the run's budget (every step sees batch_size x seq_len tokens)."""
        return self.params * self.steps


def domain_label(source: str) -> str:
    """A short name for a domain source: the embedded name, or the file or folder name without suffix."""
    label = _UNSAFE.sub("-", Path(source).stem.lower()).strip("-.") or "domain"
    return label[:MAX_LABEL]


def domain_labels(sources: list[str]) -> list[str]:
    """Distinct labels for a run's domains (a clash gets the domain's index appended)."""
    labels: list[str] = []
    for index, source in enumerate(sources):
        label = domain_label(source)
        labels.append(label if label not in labels else f"{label[:MAX_LABEL - 4]}-{index}")
    return labels


def expert_model(expert: ExpertSpec) -> ModelConfig:
    """The expert's shape: its preset with d_model and n_layers replaced (heads keep the preset's head
    size, the MLP its ratio to d_model)."""
    if expert.preset not in PRESETS:
        raise JobError(f"unknown model preset {expert.preset!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[expert.preset]
    d_model = expert.d_model or base.d_model
    n_layers = expert.n_layers or base.n_layers
    if d_model % base.head_dim:
        raise JobError(f"d_model {d_model} is not a multiple of the {expert.preset} preset's head size {base.head_dim}")
    d_ff = max(1, round(base.d_ff * d_model / base.d_model))
    return ModelConfig.from_preset(expert.preset, d_model=d_model, n_layers=n_layers,
                                   n_heads=d_model // base.head_dim, d_ff=d_ff)


def jobs_from_spec(spec: RunSpec) -> list[ExpertJob]:
    """Every job of the run in a fixed order: heterogeneous experts, homogeneous experts, the dense model."""
    experts = spec.experts
    if not experts.heterogeneous and not experts.homogeneous and not experts.dense:
        raise JobError("the run spec has no expert jobs: plan them with `swarmtrain ensemble plan` "
                       "(or `swarmtrain run init --mode experts`)")
    labels = dict(zip(spec.data.domains, domain_labels(spec.data.domains)))
    jobs: list[ExpertJob] = []
    for ensemble in ENSEMBLES:
        for expert in getattr(experts, ensemble):
            jobs.append(_job(len(jobs), f"{PREFIX[ensemble]}.{labels[expert.domain]}", ensemble, (expert.domain,),
                             expert, spec.model.seq_len))
    for expert in experts.dense:
        assert expert.domain == DENSE_DOMAIN
        jobs.append(_job(len(jobs), DENSE, DENSE, tuple(spec.data.domains), expert, spec.model.seq_len))
    return jobs


def _job(index: int, name: str, ensemble: str, domains: tuple[str, ...], expert: ExpertSpec, seq_len: int) -> ExpertJob:
    try:
        model = expert_model(expert)
    except ValueError as error:
        raise JobError(f"expert {name}: {error}") from None
    if seq_len > model.max_seq_len:
        raise JobError(f"expert {name}: model.seq_len {seq_len} exceeds the {expert.preset} preset's "
                       f"max_seq_len {model.max_seq_len}")
    return ExpertJob(index, name, ensemble, domains, model, expert.steps, expert.lr)


def ensemble_jobs(jobs: list[ExpertJob], ensemble: str) -> list[ExpertJob]:
    return [job for job in jobs if job.ensemble == ensemble]


def total_compute(jobs: list[ExpertJob]) -> int:
    return sum(job.compute for job in jobs)
