"""Gradient probes of trained scVI-family decoders (CELLxGENE Census models included)."""

__all__: list[str] = []
