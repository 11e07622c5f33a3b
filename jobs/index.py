"""Index an AI-Hub root into a manifest (one row per labelled image, split by person).

    python jobs/index.py --root ROOT_OR_S3 --output DIR_OR_S3 [--per-class 7000] [--seed 0]
    ray job submit --working-dir . -- python jobs/index.py --root s3://BUCKET/aihub --output s3://BUCKET/kemo/index

Indexing is listing plus 14 JSON files: no Ray cluster is needed (about a minute for the 500k-image corpus on S3).
On this machine (2 cores): 0.5 s to start, then ~0.16 ms a photo (4,200 generated photos in about a second).
Output: manifest.parquet, report.json (missing images, orphans, folder purity, sample), config.json, _commit.json.
"""

import logging

from kemo.config import parse, refusals
from kemo.data.aihub import IndexConfig, run

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse(IndexConfig)
    with refusals():
        run(cfg)
