"""Fine-tune and evaluate the face detector: the paper's Table 4.

    python jobs/train_detector.py --input ROOT_OR_MANIFEST --output DIR_OR_S3 [--weights PATH_OR_URI | --model YAML] \\
        [--images 3500] [--epochs 50] [--imgsz 640] [--batch 16] [--device auto] [--smoke-test]
    ray job submit --working-dir . -- python jobs/train_detector.py --input s3://BUCKET/kemo/index \\
        --output s3://BUCKET/kemo/detector --weights s3://BUCKET/weights/face.pt --gpus 1

On this machine (2 cores, CPU): the demo's 210 photos, 18 epochs at 256 px in 154 s; a YOLO11n from its YAML on
300 photos, 25 epochs at 320 px in about 10 minutes.

Output: best.pt, best.pt.sha256, meta.json (source, data, config, metrics), table4.md, config.json and, last,
_commit.json; use it with `jobs/preprocess.py --detector yolo --weights OUTPUT/best.pt --weights-sha256 SHA`.
With --gpus N the whole job runs as one Ray task holding N GPUs of one node (ultralytics' DDP across them);
otherwise it runs in this process on --device. A rerun resumes: the export skips what it wrote and ultralytics
continues from the last epoch it saved (both live in the work directory, on the disk of the node that ran the job).
"""

import logging

import ray

from kemo.config import parse, refusals
from kemo.detector.train import TrainDetectorConfig, run
from kemo.resources import check_shared, connect

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse(TrainDetectorConfig)
    with refusals():
        if cfg.gpus > 0:
            nodes = connect()
            # the task runs on any node: what it reads and writes must be there too
            check_shared({"--input": cfg.input, "--output": cfg.output}, len(nodes),
                         "the training task may run on another node")
            meta = ray.get(ray.remote(num_gpus=cfg.gpus, num_cpus=cfg.cpus)(run).remote(cfg))
        else:
            meta = run(cfg)
    for when, m in (("before", meta.metrics.before), ("after", meta.metrics.after)):
        if m:
            print(f"{when:>6}: mAP@0.5 {m.map50:.4f}  mAP@0.5:0.95 {m.map50_95:.4f}  "
                  f"primary-face recall {m.primary_face_recall:.4f}  ({m.photos} test photos)")
    print(f"best.pt sha256 {meta.weights.sha256}; trained in {meta.train.seconds} s, job {meta.seconds} s")
