"""Facial-emotion classifiers: K-EmotionNet and the paper's baselines, trained on Ray Train.

- :mod:`~kemo.classifier.networks`: the network factories and the weighted-layer count.
- :mod:`~kemo.classifier.registry`: ``create_model(name, num_classes)`` and a user's initial weights.
- :mod:`~kemo.classifier.data`: crop shards → Ray Data splits decoded on the nodes, cached when they fit.
- :mod:`~kemo.classifier.train`: ``train_one_epoch``, ``evaluate`` and one Ray Train run (``fit``).
- :mod:`~kemo.classifier.checkpoint`: the checkpoint directory (``model.pt`` + ``meta.json``) and its input batch.
- :mod:`~kemo.classifier.metrics`: confusion matrix, accuracy, per-class figures, macro-F1, the annotators' agreement.
- :mod:`~kemo.classifier.calibration`: temperature scaling, ECE/NLL/Brier, accuracy against coverage, the abstention
  threshold.
- :mod:`~kemo.classifier.experiment`: every (crops × model × target × seed) run, calibrated on validation, tested and
  reported.
"""
