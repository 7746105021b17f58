"""Combining experts at inference: a uniform mean of log-probabilities, and the per-token Bayesian
domain posterior mixture (Branch-Train-Merge), with its prior estimated on held-out data.

Shapes: K experts, N sequences, T positions, V vocabulary.

- Uniform mean: log p(. | x_<t) = log_softmax(mean_k log p_k(. | x_<t)), renormalised over the
  vocabulary so that its perplexity compares with the others.
- Posterior mixture: p(x_t | x_<t) = sum_k w_k,t p_k(x_t | x_<t), where
  w_k,t = P(D=k | x_<t) is proportional to prior_k * prod_{i<t} p_k(x_i | x_<i). At t = 0 the weights
  are the prior; every sequence starts from it afresh.
- The prior: EM on whole-sequence likelihoods of held-out sequences: pi <- mean_n P(D=k | x^n; pi),
  floored so that no expert's weight is ever exactly zero.
"""
from __future__ import annotations

import torch

PRIOR_FLOOR = 1e-3
PRIOR_ITERATIONS = 20


def uniform_mean(logprobs: torch.Tensor) -> torch.Tensor:
    """(K, ..., V) log-probabilities -> (..., V): the normalised mean of the experts' log-probabilities."""
    return torch.log_softmax(logprobs.mean(0), dim=-1)


def posterior_weights(target_logprobs: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """(K, N, T) log p_k(x_t | x_<t) of the actual next tokens, (K,) log prior -> (K, N, T) log w_k,t."""
    if target_logprobs.dim() != 3 or log_prior.shape != target_logprobs.shape[:1]:
        raise ValueError("expected (K, N, T) target log-probabilities and a (K,) log prior")
    prefix = torch.cumsum(target_logprobs, dim=-1) - target_logprobs  # sum over i < t
    joint = log_prior.view(-1, 1, 1) + prefix
    return joint - torch.logsumexp(joint, dim=0, keepdim=True)


def posterior_mixture(target_logprobs: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """(K, N, T) -> (N, T): log p(x_t | x_<t) under the posterior mixture."""
    weights = posterior_weights(target_logprobs, log_prior)
    return torch.logsumexp(weights + target_logprobs, dim=0)


def estimate_prior(target_logprobs: torch.Tensor, iterations: int = PRIOR_ITERATIONS,
                   floor: float = PRIOR_FLOOR) -> torch.Tensor:
    """(K, N, T) target log-probabilities of held-out sequences -> (K,) prior probabilities."""
    if target_logprobs.dim() != 3 or target_logprobs.shape[1] == 0:
        raise ValueError("expected (K, N, T) target log-probabilities of at least one sequence")
    k = target_logprobs.shape[0]
    sequence = target_logprobs.double().sum(-1)  # (K, N)
    prior = torch.full((k,), 1.0 / k, dtype=torch.float64)
    for _ in range(iterations):
        post = torch.softmax(prior.log().view(-1, 1) + sequence, dim=0)
        prior = post.mean(1).clamp_min(floor)
        prior = prior / prior.sum()
    return prior.float()


def next_token_mixture(logprobs: torch.Tensor, prefix_logprob: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Generation: (K, V) next-token log-probabilities, (K,) log-likelihood of the prefix under each
    expert -> (V,) log-probabilities of the posterior mixture."""
    joint = log_prior + prefix_logprob
    weights = joint - torch.logsumexp(joint, 0)
    return torch.logsumexp(weights.view(-1, 1) + logprobs, dim=0)
