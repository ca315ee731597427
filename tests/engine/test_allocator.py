"""The CPU allocator settings: after tuning, a step's worth of buffers freed and allocated again
comes back without page faults (glibc keeps it; untuned, it often hands it back to the system,
depending on where its moving mmap threshold stands)."""

import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from tunelab.engine.allocator import tune_cpu_allocator
tuned = tune_cpu_allocator() if sys.argv[1] == "tuned" else None
def step():
    buffers = [torch.ones(2**18 * (1 + i % 8)) for i in range(64)]  # 64 buffers of 1 to 8 MiB
    del buffers
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings apply on Linux only")
def test_tuned_allocator_reuses_freed_buffers_without_page_faults():
    tuned, tuned_faults = faults("tuned")
    if tuned != "True":
        pytest.skip("this Linux has no glibc (musl?): the allocator is left alone")
    pages = 8 * 36 * 2**20 // 4096
    assert tuned_faults < 0.05 * pages, tuned_faults


RETURN_SCRIPT = """
import sys, torch
from tunelab.engine.allocator import QUANTIZED_MMAP_THRESHOLD, tune_cpu_allocator
tune_cpu_allocator(QUANTIZED_MMAP_THRESHOLD if sys.argv[1] == "quantized" else 32 * 2**20)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
before = rss()
kept = []
for i in range(200):  # dequantised weights of 1.5 MiB freed between small buffers that stay: a fragmenting pattern
    temporary = torch.ones(3 * 2**17)
    kept.append(torch.ones(2**10))
    del temporary
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings apply on Linux only")
def test_quantised_threshold_hands_temporaries_back_to_the_system():
    def grown(mode: str) -> float:
        return float(subprocess.run([sys.executable, "-c", RETURN_SCRIPT, mode], capture_output=True, text=True, check=True).stdout)

    assert grown("quantized") < 20, "1.5 MiB temporaries stayed in the process under the 1 MiB threshold"
