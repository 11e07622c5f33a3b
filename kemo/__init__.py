"""kemo: Korean facial-emotion recognition at corpus scale, on Ray.

The library never calls ``ray.init()``; jobs in ``jobs/`` do. Importing kemo makes ultralytics offline
(no weight, font or pip downloads at run time) unless the caller has already decided otherwise.
"""

import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")

__version__ = "0.1.0"
