"""pdv.profile.allocator: profile and run ranks keep freed memory instead of handing it back."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pdv.profile.allocator import keep_freed_memory

# Allocates, fills and frees a 64 MB tensor three times and prints how many MiB of resident
# memory each free handed back to the system: a fresh process per policy, since a policy is
# process-wide and cannot be undone.
_HANDED_BACK = """
import json, sys
import psutil, torch
from pdv.profile.allocator import keep_freed_memory
note = keep_freed_memory() if sys.argv[1] == "keep" else None
proc = psutil.Process()
back = []
for _ in range(3):
    t = torch.ones(16 * 1024 * 1024)
    rss = proc.memory_info().rss
    del t
    back.append((rss - proc.memory_info().rss) / 2**20)
print(json.dumps({"back_mib": back, "note": note}))
"""


def _handed_back(policy: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", _HANDED_BACK, policy], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_stays_with_the_process() -> None:
    default, kept = _handed_back("default"), _handed_back("keep")
    assert kept["note"] and "1024 MiB" in str(kept["note"])
    # By default glibc serves 64 MB with its own mapping and unmaps it on free: the next
    # allocation faults every page in again. Kept, the pages stay for the next allocation.
    assert all(mib > 60 for mib in default["back_mib"])  # type: ignore[union-attr]
    assert all(mib < 4 for mib in kept["back_mib"])  # type: ignore[union-attr]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_policy_is_set_once_and_said_the_same() -> None:
    first = keep_freed_memory()
    assert first is not None
    assert keep_freed_memory() == first
