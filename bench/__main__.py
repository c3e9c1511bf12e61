"""`make bench`: every benchmark of the project, one after the other."""
import importlib
import sys

BENCHMARKS = ["bench.ingest"]

for name in BENCHMARKS:
    print(f"\n##### {name}", flush=True)
    module = importlib.import_module(name)
    module.main(sys.argv[1:] if name == "bench.ingest" else [])
