"""End-to-end demo on a generated AI-Hub-shaped corpus, with embedded Ray (``make demo``; the stages: kemo/demo.py).

    python jobs/demo.py [--out out/demo] [--per-class 60] [--size 1600x1200]

About 10–15 minutes on 2 cores (`make demo` with .venv built: 10 min 5 s on 2026-12-06; building .venv adds ~2–3
min). Generates a corpus, indexes it, trains a face detector, preprocesses with none/haar/yolo/annotations, trains
K-EmotionNet and ResNet18 on the none, haar and yolo crops, labels held-out photos, and prints a Table-5-shaped
summary. The data is generated: no figure printed here is the paper's.
"""

import logging
import os

# Every Ray Train V2 fit (Ray 2.60) starts a detached PlacementGroupCleaner actor. Once a second it asks the state API
# whether the run's controller actor is alive, so as to remove the run's placement group should the controller die
# while the driver lives on; nothing configures the check or its interval. The dashboard serves that API: without it
# every query fails, and the cleaner logs this warning and asks again, one line a second of training (375 in a demo).
# It has nothing to protect here: a failed fit ends the demo, and a dead driver takes this embedded Ray and all its
# placement groups with it. The dashboard would make the check succeed for ~1 s more start-up and 10 more processes
# (~200 MB) on the demo's cores; so it stays off, and this console skips that one line (Ray's documented log filter:
# read when ray is imported, applied while its log deduplication is on, the default). Worker log files keep the line.
UNAVAILABLE = r"Failed to query Ray Train Controller actor state\. State API may be temporarily unavailable"
# Each of the demo's six fits also prints the same start-up lines of Ray Train's controller and worker, and the
# PreemptionWatcher's "constructor arguments in the object store" note (docs/troubleshooting.md explains it):
# the demo's own epoch lines already say which run is training.
FIT_STARTUP = (r"Requesting resources: |Attempting to start training worker group|Started training worker group"
               r"|world_rank=\d+, local_rank=|Setting up process group for|Moving model to device"
               r"|class name: 'PreemptionWatcher'")
# And each epoch, Ray Data's SplitCoordinator actor announces each training split's execution in four lines (plan,
# start, end, a progress-UI hint): 290 of a demo's lines. The epoch line says the same.
SPLIT_EPOCHS = (r"Execution plan of Dataset |Starting execution of Dataset |execution finished in [\d.]+ seconds"
                r"|A new progress UI is available")
os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = "|".join(filter(None, (os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX"),
                                                                  UNAVAILABLE, FIT_STARTUP, SPLIT_EPOCHS)))

from kemo.config import parse, refusals  # noqa: E402 (after its log filter, read when ray is imported)
from kemo.demo import DemoConfig, run  # noqa: E402
from kemo.resources import connect  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse(DemoConfig)
    with refusals():  # Ctrl-C or SIGTERM: one line and 130/143, not Ray's abort
        connect(dashboard=False)  # workers forward their log lines: training progress shows
        run(cfg)
