"""Counter-based RNG and fused update kernels: built in a later issue."""
