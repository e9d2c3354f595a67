"""Time the README's test command and write the result into the README (never typed by hand).

    python benchmarks/suite_timing.py                  # run the suite, time it, rewrite README.md
    python benchmarks/suite_timing.py --collect-only   # only count the tests (seconds)
    python benchmarks/suite_timing.py --dry-run        # print the line instead of writing it

The command is the last ``&&`` part of the second line of the README's "Two commands" block
(``python -m pytest -q``); ``--command`` replaces it. The sentence between the README's
``<!-- suite-timing -->`` markers is rewritten with the counts from pytest's summary line, the
wall time, the number of CPU cores and the load average when the run started.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- suite-timing -->", "<!-- /suite-timing -->"
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")
_COLLECTED = re.compile(r"(\d+) tests? collected")


def readme_test_command(text: str) -> str:
    """The README's test command: the last ``&&`` part of its "install and run the tests" line."""
    block = text[text.index("## Two commands") :]
    lines = [ln for ln in block.splitlines() if "pytest" in ln and not ln.startswith("#")]
    if not lines:
        raise SystemExit("README.md: no pytest command in its Two commands block")
    return lines[0].split("&&")[-1].strip()


def counts(output: str) -> dict[str, int]:
    """``{"passed": n, "skipped": n, ...}`` from pytest's last summary line."""
    tail = [ln for ln in output.strip().splitlines() if _COUNT.search(ln)]
    if not tail:
        raise SystemExit(f"no pytest summary line in the output:\n{output[-2000:]}")
    out: dict[str, int] = {}
    for n, what in _COUNT.findall(tail[-1]):
        out[what.rstrip("s") if what.startswith("error") else what] = int(n)
    return out


def sentence(c: dict[str, int], seconds: float | None, load: float, cores: int) -> str:
    """The README sentence for counts ``c`` and a wall time (None: counted, not timed)."""
    today = datetime.date.today().isoformat()
    if seconds is None:
        return (
            f"The test command collects {c['collected']} tests; their time on this kind of "
            "machine is measured by `python benchmarks/suite_timing.py` (counted on "
            f"{today})."
        )
    parts = [f"{c.get('passed', 0)} passed", f"{c.get('skipped', 0)} skipped"]
    parts += [f"{c[k]} {k}" for k in ("failed", "error") if c.get(k)]
    minutes = seconds / 60
    return (
        f"The test command ran the CPU suite in {minutes:.1f} minutes ({seconds:.0f} s) on a "
        f"{cores}-core machine with load {load:.1f} at the start ({', '.join(parts)}; measured "
        f"by `python benchmarks/suite_timing.py` on {today})."
    )


def rewrite(text: str, line: str) -> str:
    """``text`` with the sentence between the markers replaced by ``line``."""
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        raise SystemExit(f"README.md: no {START} … {END} markers")
    return text[: i + len(START)] + line + text[j:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--command", help="the test command (default: the README's)")
    ap.add_argument("--collect-only", action="store_true", help="count the tests, do not run")
    ap.add_argument("--dry-run", action="store_true", help="print the sentence, write nothing")
    ap.add_argument("--readme", type=Path, default=README, help="the README to rewrite")
    args = ap.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    cmd = shlex.split(args.command or readme_test_command(text))
    if args.collect_only:
        cmd += ["--collect-only"]
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    output = proc.stdout + proc.stderr
    if args.collect_only:
        found = _COLLECTED.findall(output)
        if not found:
            raise SystemExit(f"no 'N tests collected' line in the output:\n{output[-2000:]}")
        line = sentence({"collected": int(found[-1])}, None, load, cores)
    else:
        line = sentence(counts(output), seconds, load, cores)
    print(line)
    if not args.dry_run:
        args.readme.write_text(rewrite(text, line), encoding="utf-8")
    return 0 if proc.returncode in (0, 5) or args.collect_only else proc.returncode


if __name__ == "__main__":
    sys.exit(main())
