import sys
from pathlib import Path

# The repository root on the path, so that tests can import `tests.synthetic_data` and `benchmarks.*`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
