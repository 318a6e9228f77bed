"""The allocator fix for Dask workers (quest/infra/malloc.py), checked by page faults: under
the nanny's MALLOC_TRIM_THRESHOLD_ every large array is mmapped afresh and faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r"""
import resource, torch
from quest.infra.malloc import keep_freed_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        a = torch.ones(1 << 21)  # 8 MiB, like a batch of activations
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

plain = faults()
tuned = keep_freed_memory()
print(plain, faults(), tuned)
"""


def test_keep_freed_memory_stops_refaulting_under_the_dask_nanny_environment():
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536")  # what Dask's nanny sets
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    plain, after, tuned = int(out[0]), int(out[1]), out[2]
    assert tuned == "True"
    # every one of the 40 fresh mmaps faults its pages in (at least 256 faults each, fewer than
    # 2,048 where the kernel maps huge pages); reused heap memory faults far less (torch tensors:
    # numpy's own allocation cache hides the effect when OpenBLAS runs one thread)
    assert plain > 40 * 256
    assert after < plain / 4
