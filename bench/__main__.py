"""`make bench`: every benchmark of the project, one after the other, each with its defaults.

Run one alone with its own options: `python -m bench.ingest --help` (likewise bench.identity,
bench.kafka, bench.analytics). `python -m bench NAME…` runs only those named.
"""
import importlib
import sys

BENCHMARKS = ["ingest", "identity", "kafka", "analytics", "serve", "visible", "console", "audiences", "privacy",
              "steward"]


def main(names: list[str]) -> None:
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"bench: unknown benchmark {unknown[0]!r} (known: {', '.join(BENCHMARKS)})")
    for name in names or BENCHMARKS:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"bench.{name}":
                raise
            continue  # not part of this checkout
        print(f"\n##### bench.{name}", flush=True)
        module.main([])


if __name__ == "__main__":
    main(sys.argv[1:])
