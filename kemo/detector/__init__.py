"""The face detector stage: inference (base, registry and one module per detector, weights by hash) and training:
dataset export, YOLO-Face-v2 modules, metrics, training and evaluation."""
