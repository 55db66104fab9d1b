"""Interchange with other tools' model formats (quantized checkpoints, exchange graphs such as ONNX)."""
