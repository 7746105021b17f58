"""Seeds of the shared perturbations: a keyed hash of fixed-width fields, never string concatenation.

``probe_seed(run, step, node, sample)`` hashes the 16-byte run id, the step and sample as unsigned
64-bit integers and the 32-byte node key, each at a fixed position, so two different tuples never
feed the hash the same bytes (concatenating "1" + "23" and "12" + "3" does). The first 8 bytes of
blake2b are the Philox key (kernels.rademacher.seed_to_key).
"""
from __future__ import annotations

import hashlib
import struct

RUN_ID_BYTES = 16
NODE_ID_BYTES = 32
_PERSON_PROBE = b"swarmtrain/zo-z"  # blake2b personalisation: seeds for z never equal other hashes
_PERSON_ROUND = b"swarmtrain/zo-q"


def _check(run_id: bytes, node_id: bytes, step: int, sample: int) -> None:
    if len(run_id) != RUN_ID_BYTES or len(node_id) != NODE_ID_BYTES:
        raise ValueError(f"run id must be {RUN_ID_BYTES} bytes and node id {NODE_ID_BYTES} bytes")
    if not (0 <= step < 1 << 64 and 0 <= sample < 1 << 64):
        raise ValueError("step and sample must be unsigned 64-bit integers")


def probe_seed(run_id: bytes, step: int, node_id: bytes, sample: int) -> int:
    """The 64-bit seed of perturbation z for (run, step, node, sample)."""
    _check(run_id, node_id, step, sample)
    message = run_id + struct.pack("<Q", step) + node_id + struct.pack("<Q", sample)
    return int.from_bytes(hashlib.blake2b(message, digest_size=8, person=_PERSON_PROBE).digest(), "little")


def rounding_uniform(seed: int) -> float:
    """A uniform number in [0, 1) for the quantizer's stochastic rounding of probe ``seed``'s scalar.

    Seeded, so a contribution can be re-derived and audited from its seed and loss values.
    """
    digest = hashlib.blake2b(struct.pack("<Q", seed), digest_size=8, person=_PERSON_ROUND).digest()
    return (int.from_bytes(digest, "little") >> 11) / float(1 << 53)
