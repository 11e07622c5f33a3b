"""kemo: Korean facial-emotion recognition at corpus scale, on Ray.

Label, preprocess and train start Ray (``kemo.resources.connect``) only once they know they have work for it, so
flag errors, refusals and reruns with nothing to do answer without it; index needs no Ray; the benchmark and demo
doors call ``connect`` before their stage runs, the detector door only to train on a GPU.
Importing kemo makes ultralytics offline (no weight, font or pip downloads at run time) unless the caller has
already decided otherwise.
"""

import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")

__version__ = "0.1.0"
