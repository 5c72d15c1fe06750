"""tinyvila.tools (filled by later issues)."""
