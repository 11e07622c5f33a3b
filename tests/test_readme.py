"""The README a newcomer reads: at most 300 lines, every job flag it (and docs/) shows exists, its links resolve, and
its annotated file tree equals the repository. Fast: one `--help` subprocess per job, no Ray started."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_LINES = 300
JOB = re.compile(r"(?:^|/)jobs/(\w+)\.py$")
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<"}


def fenced_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(line number of the first line inside, lines) of every ``` block."""
    blocks, inside, start, lines = [], False, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if inside:
                blocks.append((start, lines))
            inside, start, lines = not inside, number + 1, []
        elif inside:
            lines.append(line)
    return blocks


def shell_lines(block: list[str], start: int) -> list[tuple[int, str]]:
    """The block's command lines, each with the number of its first line; continuations (`\\` at the end) joined."""
    joined, current, first = [], "", start
    for number, line in enumerate(block, start):
        if not current:
            first = number
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            joined.append((first, current + line))
            current = ""
    if current:
        joined.append((first, current))
    return joined


def tokens(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an apostrophe in prose: the flags are still whitespace-separated words
        return line.split("#")[0].split()


def job_flags(line: str) -> list[tuple[str, list[str]]]:
    """(job, its flags) for each `jobs/<name>.py` in a command line; `ray job submit`'s own flags come before it."""
    found, words = [], tokens(line)
    for i, word in enumerate(words):
        match = JOB.search(word)
        if not match:
            continue
        flags = []
        for arg in words[i + 1:]:
            if arg in SHELL_OPERATORS or JOB.search(arg):
                break
            if re.fullmatch(r"--[a-z][a-z0-9-]*(=.*)?", arg):
                flags.append(arg.split("=", 1)[0])
        found.append((match.group(1), flags))
    return found


def shown_commands(path: Path) -> list[tuple[str, int, str, list[str]]]:
    """(file, line, job, flags) for every job command the page shows: in fenced blocks and in inline code spans."""
    text, name = path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix()
    shown, fenced = [], set()
    for start, block in fenced_blocks(text):
        fenced.update(range(start, start + len(block)))
        for number, line in shell_lines(block, start):
            shown += [(name, number, job, flags) for job, flags in job_flags(line)]
    for number, line in enumerate(text.splitlines(), 1):
        if number in fenced:
            continue
        for span in re.findall(r"`([^`]*jobs/\w+\.py[^`]*)`", line):
            shown += [(name, number, job, flags) for job, flags in job_flags(span)]
    return shown


README_COMMANDS = shown_commands(README)
DOCS_COMMANDS = [c for page in DOCS for c in shown_commands(page)]


@pytest.fixture(scope="module")
def helps() -> dict[str, tuple[int, str]]:
    """Every job's --help, the subprocesses run side by side (each imports torch and Ray: a few seconds)."""
    jobs = sorted({job for _, _, job, _ in README_COMMANDS + DOCS_COMMANDS if (ROOT / "jobs" / f"{job}.py").exists()})
    procs = {job: subprocess.Popen([sys.executable, f"jobs/{job}.py", "--help"], cwd=ROOT, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for job in jobs}
    return {job: (proc.wait(timeout=300), proc.communicate()[0]) for job, proc in procs.items()}


def stale_flags(commands: list[tuple[str, int, str, list[str]]], job: str, helps: dict) -> list[str]:
    problems = []
    if not (ROOT / "jobs" / f"{job}.py").exists():
        where = ", ".join(f"{f}:{n}" for f, n, j, _ in commands if j == job)
        return [f"jobs/{job}.py does not exist (shown at {where})"]
    status, text = helps[job]
    if status != 0:
        return [f"`python jobs/{job}.py --help` exited {status}:\n{text[-2000:]}"]
    for file, number, j, flags in commands:
        if j != job:
            continue
        problems += [f"{file}:{number}: jobs/{job}.py has no flag {flag}" for flag in flags
                     if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]
    return problems


def test_readme_is_at_most_300_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; move detail into docs/ (at most {MAX_LINES})"


def test_the_readme_shows_the_four_jobs():
    shown = {job for _, _, job, _ in README_COMMANDS}
    assert {"index", "preprocess", "train_detector", "train", "label"} <= shown, shown


@pytest.mark.parametrize("job", sorted({job for _, _, job, _ in README_COMMANDS}))
def test_every_flag_the_readme_shows_is_one_its_job_takes(job, helps):
    problems = stale_flags(README_COMMANDS, job, helps)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("job", sorted({job for _, _, job, _ in DOCS_COMMANDS}))
def test_every_flag_the_docs_show_is_one_its_job_takes(job, helps):
    problems = stale_flags(DOCS_COMMANDS, job, helps)
    assert not problems, "\n".join(problems)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    in_code = {n for start, block in fenced_blocks(text) for n in range(start, start + len(block))}
    return {slug(line.lstrip("#")) for n, line in enumerate(text.splitlines(), 1)
            if line.startswith("#") and n not in in_code}


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_between_pages_resolve(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


def readme_tree() -> list[str]:
    """The paths the README's «Files» block lists: one entry a line, two spaces of indent a level, folders end in
    `/`, a description after two spaces or more."""
    text = README.read_text(encoding="utf-8")
    after = text[text.index("\n## Files\n"):]
    _, block = fenced_blocks(after)[0]
    paths, folders = [], []
    for line in block:
        match = re.match(r"( *)(\S+)(?: {2,}.*)?$", line)
        assert match, f"tree line is not `name  description`: {line!r}"
        indent, name = len(match.group(1)), match.group(2)
        assert indent % 2 == 0 and indent // 2 <= len(folders), f"tree line indented under no folder: {line!r}"
        del folders[indent // 2:]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        else:
            paths.append("/".join([*folders, name]))
    return paths


def repository_files() -> set[str]:
    """Tracked files and untracked ones git does not ignore (new files count), as they are on disk now."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout: {e}")
    return {f for f in out.splitlines() if (ROOT / f).is_file()}


def test_the_file_tree_equals_the_repository():
    listed = readme_tree()
    doubled = sorted({p for p in listed if listed.count(p) > 1})
    files = repository_files()
    missing = sorted(files - set(listed))
    extra = sorted(set(listed) - files)
    report = [f"in the repository, not in the README's tree: {p}" for p in missing]
    report += [f"in the README's tree, not in the repository: {p}" for p in extra]
    report += [f"listed twice: {p}" for p in doubled]
    assert not report, "\n".join(report)


def test_commands_are_read_as_a_shell_reads_them():
    assert JOB.search("jobs/train_detector.py") and not JOB.search("jobs/<stage>.py")
    assert job_flags("ray job submit --working-dir . -- python jobs/label.py --input s3://b/x --gpus-per-actor 1 "
                     "# --not-this") == [("label", ["--input", "--gpus-per-actor"])]
    assert shell_lines(["python jobs/train.py --shards a \\", "    --output b  # after make demo"], 1) == [
        (1, "python jobs/train.py --shards a      --output b  # after make demo")]
