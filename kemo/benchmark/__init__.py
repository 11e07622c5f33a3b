"""What each stage costs on this machine, against a plain per-image loop measured in the same run.

A ratio against a loop a user would write first (``cv2.imread`` → detector → crop, one photo at a time) says what
the pipeline's batching, actor pools and threads buy, on the hardware at hand, which no absolute number can. One
module per stage (decode, detect, preprocess, scaling, train, label, scale) beside the config, the photos, the probes,
the plain loops, the report and the job (:mod:`~kemo.benchmark.job`, ``run``).
"""

from kemo.benchmark.config import BenchmarkConfig
from kemo.benchmark.job import run

__all__ = ["BenchmarkConfig", "run"]
