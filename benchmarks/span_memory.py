"""Peak memory of loading one span vs the whole model (each in a fresh process).

    python benchmarks/span_memory.py [--model smollm2-135m] [--blocks 0:10]

Prints peak RSS after imports, after loading the span, and after loading every block.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, torch
from llmswarm.models.checkpoint import Checkpoint
from llmswarm.models.fetch import locate
from llmswarm.models.registry import resolve
from llmswarm.models.span import load_span
ckpt = Checkpoint.open(locate(resolve(sys.argv[1])))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start, end = (int(x) for x in sys.argv[2].split(":"))
span = load_span(ckpt, start, end, torch.float32)
sum(float(p.sum()) for p in span.blocks.parameters())  # fault every weight page in: mapped pages count once touched
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"blocks": sys.argv[2], "imports_mib": base / 1024, "peak_mib": peak / 1024,
                  "added_mib": (peak - base) / 1024, "span_weights_mib": span.nbytes / 2**20}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="0:10")
    args = ap.parse_args()
    from llmswarm.models.checkpoint import Checkpoint
    from llmswarm.models.fetch import locate
    from llmswarm.models.registry import resolve

    total = Checkpoint.open(locate(resolve(args.model))).config.num_blocks
    for blocks in (args.blocks, f"0:{total}"):
        out = subprocess.run([sys.executable, "-c", CHILD, args.model, blocks], capture_output=True, text=True,
                             check=True)
        print(json.dumps(json.loads(out.stdout)))


if __name__ == "__main__":
    main()
