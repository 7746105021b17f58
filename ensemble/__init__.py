"""Domain expert ensembles (HDEE): expert jobs planned under a compute budget, trained independently by
swarm nodes, combined at inference by a uniform mean of log-probabilities or the per-token domain posterior.

Modules: ``jobs`` (the run's jobs from its spec), ``allocation`` (heterogeneous and homogeneous plans of equal
compute), ``plan`` (difficulty, the seed model and the signed spec), ``data`` (train / prior / eval splits),
``train`` (one expert's model and optimizer), ``checkpoint`` (content-addressed safetensors store),
``board`` (leases and checkpoint records), ``worker`` (a node's loop), ``combine`` and ``evaluate``.
"""
