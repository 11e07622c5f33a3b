"""Benchmark kemo's stages against plain per-image loops and the hardware, on this machine (see kemo/benchmark/).

    python jobs/benchmark.py [--stages decode,detect,preprocess,scaling,train,label,scale] [--images 300]
        [--size 2000x1500] [--no-texture] [--decode-sizes 2000x1500,4000x3000]
        [--detectors annotations,none,haar,yolo --weights face.pt] [--output DIR]
        [--smoke-test]
    ray job submit --working-dir . -- python jobs/benchmark.py --output /tmp/bench

About 5–6 minutes with the defaults on 2 quiet cores (300 generated 3 MP photos; training, 512 images at 64² three
times over, is almost half of it). --smoke-test runs every requested stage at the smallest size (14 photos of
320x240, two epochs of 32 images at 32², scaling at one worker and at all): under a minute on 2 cores (53 s, Ray's
start-up included), to check that the benchmark works, not to quote. --stages scale (not in the default) runs
index, preprocess, the training input and label as their own drivers at a handful, N and 10×N photos (--scale-photos
420: ~13 minutes on 2 cores). Output, committed like every job's:
benchmark.json, benchmark.md, scaling.png (with the scaling stage), config.json and, last, _commit.json; prints the
Markdown. On a GPU node give yolo weights (--weights, and yolo in --detectors): the GPU scaling runs and the label
stage use them.
"""

import logging

import ray

from kemo.benchmark import BenchmarkConfig, run
from kemo.benchmark.report import markdown
from kemo.config import parse, refusals
from kemo.resources import connect

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse(BenchmarkConfig)
    with refusals():
        connect()
        ray.data.DataContext.get_current().enable_progress_bars = False
        print(markdown(run(cfg)))
