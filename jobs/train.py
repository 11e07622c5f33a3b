"""Train K-EmotionNet and its baselines on crop shards with Ray Train: the paper's Table 5 and Figure 4.

    python jobs/train.py --shards out/crops/annotations,out/crops/none --output out/classify \\
        [--models kemotionnet,resnet18,vgg19] [--seeds 3] [--epochs 150] [--batch-size 64] [--lr 0.001] \\
        [--image-size 224] [--target majority[,votes]] [--target-accuracy 0.9] [--workers N] [--use-gpu] \\
        [--smoke-test]
    ray job submit --working-dir . -- python jobs/train.py --shards s3://bucket/kemo/crops/yolo \\
        --output s3://bucket/kemo/classify --workers 4 --use-gpu

Output: runs/<preprocessing>-<model>-seed<k>/ (Ray Train checkpoints, each best one calibrated: temperature and
abstention threshold in its meta.json), results/<run>.json, report.json, table5.md, confusion.png, curves.png,
reliability.png, coverage.png, config.json and, last, _commit.json. A rerun skips finished runs and resumes the others.
"""

import logging

from kemo.classifier.experiment import TrainConfig, run
from kemo.config import parse, refusals

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse(TrainConfig)
    with refusals():
        report = run(cfg)
    for row in report.rows:
        a, f, e = row.accuracy, row.macro_f1, row.ece
        agree = "–" if row.annotators is None else f"{100 * row.annotators:.1f}"
        print(f"{row.preprocessing:<12} {row.model:<12} {row.target:<8} accuracy {100 * a.mean:.2f} ± "
              f"{100 * a.std:.2f} ({100 * row.accuracy_on_faces.mean:.2f} on the {100 * row.face_coverage:.1f}% "
              f"with a face)  macro-F1 {100 * f.mean:.2f} ± {100 * f.std:.2f}  ECE "
              f"{100 * e.before.mean:.1f} → {100 * e.after.mean:.1f}%  annotators agree {agree}%  ({a.n} runs)")
    print(f"report: {cfg.output}/table5.md, {report.seconds} s")
