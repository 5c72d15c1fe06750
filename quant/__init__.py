"""tinyvila.quant: quantizing checkpoints (AWQ 4-bit search and packing, SmoothQuant W8A8 calibration, writing)."""
