"""The evaluation table: validation perplexity per domain of each expert alone, of both ensembles under
both combination rules, and of the dense model; and sampling text from an ensemble.

Every number comes from each domain's eval split; the posterior rule's prior for a domain is
estimated on that domain's prior split (Branch-Train-Merge estimates it from the target domain, on
data evaluation does not use). Generation, which has no target domain, uses the mean of those priors.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ensemble.combine import estimate_prior, next_token_mixture, posterior_mixture, uniform_mean
from ensemble.data import DomainSplits, windows
from ensemble.jobs import DENSE, ENSEMBLES, ExpertJob
from trainer.model import LM

RULES = ("uniform", "posterior")


@dataclass(frozen=True)
class EvalSettings:
    seq_len: int = 128
    max_tokens: int = 16384  # eval targets per domain
    prior_tokens: int = 8192  # prior-split targets per domain
    batch_size: int = 16
    device: str = "cpu"


def row_name(ensemble: str, rule: str) -> str:
    return f"{ensemble} ({rule})"


@torch.no_grad()
def model_logprobs(model: LM, inputs: torch.Tensor, batch_size: int, device: str) -> torch.Tensor:
    """(N, T) inputs -> (N, T, V) next-token log-probabilities, on the CPU."""
    model.eval()
    out = []
    for i in range(0, len(inputs), batch_size):
        logits = model(inputs[i : i + batch_size].to(device))
        out.append(torch.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(out)


def _targets(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _members(jobs: Sequence[ExpertJob], ensemble: str) -> list[ExpertJob]:
    return [job for job in jobs if job.ensemble == ensemble]


def estimate_priors(jobs: Sequence[ExpertJob], models: Mapping[str, LM], splits: Sequence[DomainSplits],
                    labels: Sequence[str], settings: EvalSettings) -> dict[str, dict[str, list[float]]]:
    """{ensemble: {domain label: prior over its experts}} from each domain's prior split."""
    priors: dict[str, dict[str, list[float]]] = {}
    for label, split in zip(labels, splits):
        inputs, targets = windows(split.prior, settings.seq_len, settings.prior_tokens)
        for ensemble in ENSEMBLES:
            members = _members(jobs, ensemble)
            if not members:
                continue
            stacked = torch.stack([_targets(model_logprobs(models[j.name], inputs, settings.batch_size,
                                                           settings.device), targets) for j in members])
            priors.setdefault(ensemble, {})[label] = estimate_prior(stacked).tolist()
    return priors


def evaluate_table(jobs: Sequence[ExpertJob], models: Mapping[str, LM], splits: Sequence[DomainSplits],
                   labels: Sequence[str], settings: EvalSettings) -> dict:
    """Loss and perplexity of every row on every domain's eval split."""
    priors = estimate_priors(jobs, models, splits, labels, settings)
    rows: dict[str, dict] = {}

    def row(name: str, kind: str, members: Sequence[ExpertJob]) -> dict:
        return rows.setdefault(name, {"name": name, "kind": kind, "params": sum(j.params for j in members),
                                      "compute": sum(j.compute for j in members), "loss": {}, "perplexity": {}})

    tokens: dict[str, int] = {}
    for label, split in zip(labels, splits):
        inputs, targets = windows(split.eval, settings.seq_len, settings.max_tokens)
        tokens[label] = targets.numel()
        by_job: dict[str, torch.Tensor] = {}
        sums: dict[str, torch.Tensor] = {}
        for job in jobs:
            logprobs = model_logprobs(models[job.name], inputs, settings.batch_size, settings.device)
            by_job[job.name] = _targets(logprobs, targets)
            if job.ensemble in ENSEMBLES:
                sums[job.ensemble] = logprobs if job.ensemble not in sums else sums[job.ensemble] + logprobs
            del logprobs
        for job in jobs:
            entry = row(job.name, "dense" if job.ensemble == DENSE else "expert", [job])
            entry["steps"] = job.steps
            entry["loss"][label] = -float(by_job[job.name].double().mean())
        for ensemble in ENSEMBLES:
            members = _members(jobs, ensemble)
            if not members:
                continue
            uniform = _targets(uniform_mean(sums[ensemble].unsqueeze(0) / len(members)), targets)
            log_prior = torch.tensor(priors[ensemble][label]).log()
            posterior = posterior_mixture(torch.stack([by_job[j.name] for j in members]), log_prior)
            for rule, values in (("uniform", uniform), ("posterior", posterior)):
                row(row_name(ensemble, rule), "ensemble", members)["loss"][label] = -float(values.double().mean())
    for entry in rows.values():
        entry["perplexity"] = {d: math.exp(loss) for d, loss in entry["loss"].items()}
        mean_loss = sum(entry["loss"].values()) / len(entry["loss"])
        entry["mean_perplexity"] = math.exp(mean_loss)
    ordered = [rows[j.name] for j in jobs if j.ensemble != DENSE]
    ordered += [rows[row_name(e, r)] for e in ENSEMBLES for r in RULES if row_name(e, r) in rows]
    ordered += [rows[j.name] for j in jobs if j.ensemble == DENSE]
    return {"domains": list(labels), "rows": ordered, "priors": priors, "tokens": tokens,
            "seq_len": settings.seq_len}


def heterogeneous_wins(table: dict, rule: str = "posterior") -> list[str]:
    """Domains where the heterogeneous ensemble's perplexity is below the homogeneous one's."""
    rows = {r["name"]: r for r in table["rows"]}
    het, hom = rows.get(row_name("heterogeneous", rule)), rows.get(row_name("homogeneous", rule))
    if het is None or hom is None:
        return []
    return [d for d in table["domains"] if het["perplexity"][d] < hom["perplexity"][d]]


def format_table(table: dict) -> str:
    domains = table["domains"]
    name_width = max(len("model"), *(len(r["name"]) for r in table["rows"]))
    width = max(10, *(len(d) for d in domains))
    header = f"{'model':<{name_width}}  {'params':>9}  " + "  ".join(f"{d:>{width}}" for d in domains) + \
        f"  {'mean':>{width}}"
    lines = [header, "-" * len(header)]
    for r in table["rows"]:
        cells = "  ".join(f"{r['perplexity'][d]:>{width}.3f}" for d in domains)
        lines.append(f"{r['name']:<{name_width}}  {r['params']:>9,}  {cells}  {r['mean_perplexity']:>{width}.3f}")
    return "\n".join(lines)


@torch.no_grad()
def generate(models: Sequence[LM], prompt: Sequence[int], new_tokens: int, *, rule: str, log_prior: torch.Tensor,
             temperature: float, generator: torch.Generator, device: str = "cpu") -> list[int]:
    """Sample from the ensemble: each token from the combined next-token distribution."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}")
    context_len = min(m.cfg.max_seq_len for m in models)
    tokens = list(prompt)
    for model in models:
        model.eval()
    for _ in range(new_tokens):
        context = torch.tensor([tokens[-context_len:]], dtype=torch.long, device=device)
        logprobs = [torch.log_softmax(m(context)[0].float(), -1).cpu() for m in models]  # each (L, V)
        last = torch.stack([lp[-1] for lp in logprobs])
        if rule == "uniform":
            combined = uniform_mean(last.unsqueeze(1))[0]
        else:
            ids = context[0, 1:].cpu()
            prefix = torch.stack([lp[:-1].gather(-1, ids.unsqueeze(-1)).sum() for lp in logprobs])
            combined = next_token_mixture(last, prefix, log_prior)
        if temperature <= 0:
            tokens.append(int(combined.argmax()))
        else:
            probs = torch.softmax(combined / temperature, -1)
            tokens.append(int(torch.multinomial(probs, 1, generator=generator)))
    return tokens
