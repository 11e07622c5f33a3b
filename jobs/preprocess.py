"""Detect and crop every face of a corpus into Parquet crop shards (Ray Data, actor pools).

    python jobs/preprocess.py --input ROOT_OR_MANIFEST --output DIR_OR_S3 --detector {yolo,haar,none,annotations} \\
        [--weights PATH_OR_URI] [--per-class N] [--seed S] [--crop-size 500] [--margin 0.25] [--gallery 48] \\
        [--smoke-test]
    ray job submit --working-dir . -- python jobs/preprocess.py --input s3://BUCKET/kemo/index \\
        --output s3://BUCKET/kemo/crops/yolo --detector yolo --weights s3://BUCKET/weights/face.pt

On this machine (2 cores, no GPU): Ray's 3–5 s start-up, then ~150–200 photos/s with `annotations` or `none` and
~19 photos/s with `haar` at 3 MP; the demo's four runs over 420 photos take 55 s.

Output: shards/part-*.parquet (one row per photo, status for each, the annotators' votes carried), gallery.html
(crops per status and those away from the annotators' box, self-contained), summary.json, _run.json, config.json and,
last, _commit.json. Killed or failed runs resume when the same command is run again. Embedded Ray's workers inherit
this process's environment; on a cluster, a non-AWS S3 endpoint reaches the workers through
`ray job submit --runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": "..."}}'` (credentials: instance profiles).
"""

import logging

from kemo.config import parse, refusals
from kemo.preprocess import PreprocessConfig, run

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse(PreprocessConfig)
    with refusals():
        summary = run(cfg)
    print(f"{summary.inputs} photos → {summary.statuses} in {summary.seconds} s "
          f"({summary.photos_per_s} photos/s processed)")
