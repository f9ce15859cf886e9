"""INT8 / INT4 calibration and accuracy gates for the exported bundles (docs/QUANTIZATION.md).

data         calibration windows from real audio, cut as the runtime cuts them; the CALIB folder
ranges       activation histograms of the audio tower's INT8 layers; minmax / percentile / entropy
qdq          the Q/DQ rewrites: INT8 activations + weights, weight-only INT8 / INT4
sensitivity  per-layer INT8 sensitivity (simulated in PyTorch) and the layers kept float
gates        speech-token cosine, LLM top-1 agreement, WER deltas; the printed table
build        the onnx-int8 / onnx-int4 / trt-int8 export targets' quantizer
cli          fastslm-calibrate
bench        python -m fastslm.calibration.bench: ONNX Runtime CPU speed against FP32
"""
