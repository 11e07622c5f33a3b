"""Re-hash every file of a committed output against its _commit.json: a file changed at the same size (a disk
error, a hand edit) is found, which the size check every reader makes cannot see.

    python jobs/verify.py --output DIR_OR_S3

Reads the whole output (on S3: downloads it, file by file; nothing is written). On this machine: about 1 s per GB of a
local output. Prints one line per missing or changed file and exits 1, or prints "intact" and exits 0. A rerun of the
job that wrote the output repairs what it can (its damaged control files, parts whose receipts do not match).
"""

import sys

from kemo.config import parse, refusals
from kemo.outputs import VerifyConfig, verify

if __name__ == "__main__":
    cfg = parse(VerifyConfig)
    with refusals():
        problems = verify(cfg)
    for line in problems:
        print(f"{cfg.output}: {line}")
    print("intact" if not problems else f"{len(problems)} files missing or changed")
    sys.exit(1 if problems else 0)
