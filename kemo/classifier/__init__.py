"""Facial-emotion classifiers: K-EmotionNet and the paper's baselines, trained on Ray Train.

- :mod:`~kemo.classifier.networks`: the network factories and the weighted-layer count.
- :mod:`~kemo.classifier.registry`: ``create_model(name, num_classes)`` and a user's initial weights.
- :mod:`~kemo.classifier.transform`: the one input transform (resize, ``/255``, the checkpoint's mean and std).
- :mod:`~kemo.classifier.data`: crop shards → Ray Data splits decoded on the nodes, cached when they fit.
- :mod:`~kemo.classifier.train`: the recipe, ``train_one_epoch`` and one Ray Train run (``fit``).
- :mod:`~kemo.classifier.checkpoint`: the checkpoint directory (``model.pt`` + ``meta.json``) and its input batch.
- :mod:`~kemo.classifier.metrics`: confusion matrix, accuracy, per-class figures, macro-F1, the annotators' agreement.
- :mod:`~kemo.classifier.calibration`: temperature scaling, ECE/NLL/Brier, accuracy against coverage, the abstention
  threshold.
- :mod:`~kemo.classifier.evaluation`: ``evaluate``, ``predict``, and a checkpoint calibrated on validation and tested.
- :mod:`~kemo.record`: results as dataclasses, read back typed (``from_dict``).
- :mod:`~kemo.classifier.report`: a run's result, Table 5's rows, ``report.json``, ``table5.md`` and the plots.
- :mod:`~kemo.classifier.experiment`: ``TrainConfig`` and every (crops × model × target × seed) run: plan, work
  (train, calibrate), reconcile, commit.
"""
