"""Fixtures for the model registry: tiny models and stand-in ONNX files (owned by the registry work)."""
