"""Label a folder or an S3 prefix of photos and videos with emotions: detect, crop and classify each face of each
photo and of each video's frames sampled by time (Ray Data actors).

    python jobs/label.py --input PHOTOS_AND_VIDEOS --output LABELS --checkpoint CKPT_DIR [--detector yolo|haar|none] \\
        [--weights PATH_OR_URI] [--all-faces] [--format parquet,csv] [--abstain | --min-confidence X] \\
        [--fps 1.0] [--segment-seconds 300] [--gallery 48] [--smoke-test]
    ray job submit --working-dir . -- python jobs/label.py --input s3://BUCKET/new-photos/ \\
        --output s3://BUCKET/kemo/labels --checkpoint s3://BUCKET/kemo/classify/best --weights s3://BUCKET/face.pt

On this machine (2 cores, no GPU): 7–15 s to start its actors, then ~18 photos/s with `haar` and a 64² K-EmotionNet
(~90 ms a photo with a 224² classifier); the demo's 40 photos in about 6 s.

Output: parts/part-*.parquet (one row per photo and per sampled video frame, or per face with --all-faces, status for
each; probabilities calibrated by the checkpoint's temperature; `abstained` below --min-confidence or, with --abstain,
the checkpoint's threshold), videos/part-*.parquet (a summary per video: status, header, emotion shares), labels.csv,
videos.csv, gallery.html (faces by emotion, abstained, no face, errors, a strip and a timeline per video:
self-contained), summary.json (photos and videos per status, faces per emotion, abstained), _run.json, config.json
and, last, _commit.json. A rerun labels only new or replaced files and keeps the rest; with nothing new it writes
nothing. On a cluster, a non-AWS S3
endpoint reaches the workers through `--runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": "..."}}'`.
"""

import logging

from kemo.config import parse, refusals
from kemo.label import LabelConfig, run

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse(LabelConfig)
    with refusals():
        summary = run(cfg)
    print(f"{summary.listed} files: {summary.processed} labelled {summary.processed_statuses}, "
          f"{summary.skipped} already labelled, in {summary.seconds} s")
    print(f"{cfg.output}: {summary.photos} photos {summary.statuses}; faces per emotion {summary.emotions}")
    if summary.videos:
        print(f"{summary.videos} videos {summary.video_statuses}: {summary.frames} sampled frames' rows; this run "
              f"labelled {summary.segments} segments, one video over {summary.segment_actors} actors at most")
    if summary.min_confidence is not None:
        print(f"abstained: {summary.abstained} of {summary.rows} rows below confidence {summary.min_confidence:.3f} "
              f"(temperature {summary.temperature:.3f})")
