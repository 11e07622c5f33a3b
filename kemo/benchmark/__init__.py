"""What each stage costs on this machine, against a plain per-image loop measured in the same run.

A ratio against a loop a user would write first (``cv2.imread`` → detector → crop, one photo at a time) says what
the pipeline's batching, actor pools and threads buy, on the hardware at hand, which no absolute number can. The
package keeps one concept per module: :mod:`~kemo.benchmark.config` (the job's config), :mod:`~kemo.benchmark.probes`
(clocks, the machine, a sampler of worker memory and GPU use), :mod:`~kemo.benchmark.loops` (the plain loops),
:mod:`~kemo.benchmark.stages` (each stage's measurements and ``run``) and :mod:`~kemo.benchmark.report`
(benchmark.md and scaling.png). The output is committed through :mod:`kemo.outputs` like every job's.
"""

from kemo.benchmark.config import BenchmarkConfig
from kemo.benchmark.stages import run

__all__ = ["BenchmarkConfig", "run"]
