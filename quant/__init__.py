"""tinyvila.quant (filled by later issues)."""
