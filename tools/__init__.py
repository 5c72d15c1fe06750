"""tinyvila.tools: the command-line tools (bench, eval, quantize, ...) and the benchmarks behind the README's tables."""
