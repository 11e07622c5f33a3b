"""Benchmark kemo's stages against plain per-image loops, on this machine (see kemo/benchmark.py).

    python jobs/benchmark.py [--images 300] [--size 2000x1500] [--detectors annotations,none,haar] [--output DIR]
    ray job submit --working-dir . -- python jobs/benchmark.py --output /tmp/bench

About 2 minutes for 300 photos and three detectors on 2 cores. Writes benchmark.json and benchmark.md.
"""

import logging

import ray

from kemo.benchmark import BenchmarkConfig, markdown, run
from kemo.config import parse

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse(BenchmarkConfig)
    ray.init()
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(markdown(run(cfg)))
