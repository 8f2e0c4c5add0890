"""Quantization of exported graphs."""
