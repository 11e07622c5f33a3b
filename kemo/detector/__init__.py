"""The face detector stage (issue 4): dataset export, YOLO-Face-v2 modules, metrics, training and evaluation."""
