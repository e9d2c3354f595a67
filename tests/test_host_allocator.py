"""The host allocator policy (repblend_fast/host_allocator.py): with ``retain`` a freed large
tensor's memory is reused without page faults; with the system default it is faulted in again.

Each case runs in a fresh interpreter: the policy is process-wide and irreversible."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from repblend_fast.host_allocator import _glibc, apply_host_allocator

PROBE = """
import json, resource, sys
import torch
from repblend_fast.host_allocator import apply_host_allocator
policy = apply_host_allocator(sys.argv[1])
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
# 256 MiB of float32, far above glibc's 32 MiB mmap ceiling. Retained, the heap settles within
# three rounds (measured: the first one to three rounds fault, every later one reuses the memory);
# four warm-up rounds leave a margin.
for _ in range(4):
    t = torch.ones(64 << 18)
    del t
before = faults()
t = torch.ones(64 << 18)
print(json.dumps({"policy": policy, "faults": faults() - before}))
"""


def _probe(policy: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, policy], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_glibc() is None, reason="the retain policy needs glibc's mallopt")
def test_retain_reuses_freed_memory_without_page_faults():
    system, retain = _probe("system"), _probe("retain")
    assert system["policy"] == "system" and retain["policy"] == "retain"
    # 256 MiB is 65,536 pages of 4 KiB: the system default maps it afresh and faults each page
    # in (fewer with transparent huge pages); retained, the second tensor reuses the first's.
    assert system["faults"] > 1000, (system, retain)
    assert retain["faults"] < system["faults"] / 20, (system, retain)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="host allocator"):
        apply_host_allocator("jemalloc")
