"""tinyvila.kernels: Triton kernels for the runtime's hot ops, one op per file, each with its plain-PyTorch reference."""
