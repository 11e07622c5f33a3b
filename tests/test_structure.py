"""The house rules that keep kemo readable, checked on its source: rooms of bounded size, and no stage that knows a
detector by name (only the detector package does; the demo and the benchmark choose which detectors to run)."""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
KEMO = ROOT / "kemo"
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 500


def sources() -> list[pathlib.Path]:
    return sorted(KEMO.rglob("*.py"))


def test_no_function_over_60_lines_and_no_file_over_500():
    long_files, long_functions = [], []
    for path in sources():
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if len(text.splitlines()) > MAX_FILE_LINES:
            long_files.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{rel}:{node.lineno} {node.name}: {lines} lines")
    assert not long_files, long_files
    assert not long_functions, long_functions


def test_the_counter_finds_a_long_function(tmp_path):
    """The rule above can fail: a 61-line function is found."""
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    tree = ast.parse(f"def f():\n{body}\n")
    (node,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    assert node.end_lineno - node.lineno + 1 == 61


NAMED = re.compile(r'"(yolo|haar|annotations)"|detector *[!=]= *"none"')
MAY_NAME = ("kemo/detector/", "kemo/benchmark/", "kemo/demo.py", "kemo/settings.py")


def test_no_stage_branches_on_a_detectors_name():
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for path in sources()
             if not str(path.relative_to(ROOT)).startswith(MAY_NAME)
             for n, line in enumerate(path.read_text().splitlines(), 1) if NAMED.search(line)]
    assert not found, found
    assert NAMED.search('if cfg.detector == "none":') and NAMED.search('name in ("yolo", "haar")')
