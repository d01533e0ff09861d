"""Quantization numerics shared by passes: grids, rounding, packing formats."""
