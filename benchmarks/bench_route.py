"""Route-solver benchmark: the same code as `llmswarm bench route` (routing/bench.py).

    python benchmarks/bench_route.py [--json] [--sizes 100,500,2000] [--seeds 0,1,2] [--no-local-search]
"""

from __future__ import annotations

import typer
from llmswarm.cli.route import bench_route

if __name__ == "__main__":
    typer.run(bench_route)
