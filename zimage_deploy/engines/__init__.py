"""The engines stage: ONNX graphs -> TensorRT / TensorRT-RTX plans, one per component."""
