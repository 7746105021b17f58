"""Mode zo: full fp32 replicas fine-tuned with SPSA, one byte per probe, bit-identical everywhere."""
