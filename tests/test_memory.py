"""Peak memory of a ResNet-20 training step stays O(activations), not O(unfolded windows).

Linux only (reads /proc/self/status).
"""

from __future__ import annotations

import json
import subprocess
import sys

from adderquant.models import create_model

# Runs in a fresh interpreter. Linux's high-water mark of its resident memory (VmHWM) is reset
# after the set-up (writing 5 to /proc/self/clear_refs), so the reported peak growth belongs to
# one forward + backward at batch 128 alone.
_SCRIPT = """
import json, re, torch
from adderquant.models import create_model

def resident(field):
    status = open("/proc/self/status").read()
    return int(re.search(field + r":\\s+(\\d+) kB", status).group(1)) * 1024

torch.manual_seed(0)
model = create_model("resnet20").train()
x = torch.randn(128, 3, 32, 32)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = resident("VmRSS")
model(x).logsumexp(1).sum().backward()
grads = sum(p.grad.numel() for p in model.parameters())
print(json.dumps({"growth": resident("VmHWM") - before, "before": before, "grads": grads}))
"""

LIMIT = 2 * 1024**3


def test_resnet20_training_step_peak_memory_below_2_gib():
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300, check=True
    )
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    n_params = sum(p.numel() for p in create_model("resnet20").parameters())
    assert stats["grads"] == n_params  # the backward pass really ran through every layer
    assert 0 < stats["growth"] < LIMIT, f"peak RSS grew by {stats['growth'] / 2**20:.0f} MiB"
