"""The export stage: checkpoint -> one ONNX graph per component."""
