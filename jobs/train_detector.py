"""Fine-tune and evaluate the face detector: the paper's Table 4.

    python jobs/train_detector.py --input ROOT_OR_MANIFEST --output DIR_OR_S3 [--weights PATH_OR_URI | --model YAML] \\
        [--images 3500] [--epochs 50] [--imgsz 640] [--batch 16] [--device auto] [--smoke-test] \\
        [--loss stock|faceV2] [--nwd-weight R] [--slide] [--rep-gt A] [--rep-box B] [--ablation all]
    ray job submit --working-dir . -- python jobs/train_detector.py --input s3://BUCKET/kemo/index \\
        --output s3://BUCKET/kemo/detector --weights s3://BUCKET/weights/face.pt --gpus 1

On this machine (2 cores, CPU): the demo's 210 photos, 18 epochs at 256 px in 154 s; a YOLO11n from its YAML on
300 photos, 25 epochs at 320 px in about 10 minutes.

Output: best.pt, best.pt.sha256, meta.json (source, data, config, metrics), table4.md, config.json and, last,
_commit.json; use it with `jobs/preprocess.py --detector yolo --weights OUTPUT/best.pt --weights-sha256 SHA`.
--loss faceV2 trains with YOLO-FaceV2's NWD box loss, slide-weighted BCE and repulsion (kemo/detector/loss.py);
--ablation all also trains the stock loss and each term alone, one row each in table4.md (docs/detector.md has a
measured run on a generated crowd: python -m kemo.data.synth --crowd).
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
    for row in meta.ablation:  # recall is None where the test split has no such face
        small, pairs = (f"{x:.4f}" if x is not None else "—" for x in (row.crowd.small_recall, row.crowd.pair_recall))
        print(f"{row.name:>18}: mAP@0.5 {row.after.map50:.4f}  mAP@0.5:0.95 {row.after.map50_95:.4f}  small-face "
              f"recall {small}  overlapping-pair recall {pairs}  {row.seconds_per_epoch:.1f} s/epoch")
    print(f"best.pt sha256 {meta.weights.sha256}; trained in {meta.train.seconds} s, job {meta.seconds} s")
