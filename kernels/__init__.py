"""tinyvila.kernels (filled by later issues)."""
