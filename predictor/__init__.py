"""tokenwire.predictor: SwiftQueue latency models, training, ONNX export and onnxruntime inference."""
