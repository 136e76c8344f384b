"""pytest set-up for the benchmark cases: importing bench.common sets TRITON_INTERPRET=1 without a GPU.

tests/conftest.py does the same for tests/, but its module is not loaded when only ``pytest bench/`` runs.
"""

import bench.common  # noqa: F401  (side effect: Triton interpreter on CPU-only machines)
