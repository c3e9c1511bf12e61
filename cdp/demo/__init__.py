"""Demo data: a seeded generator of realistic CloudEvents for the group's business units."""

from cdp.demo.generator import DemoFiles, DemoSpec, generate, iter_events

__all__ = ["DemoFiles", "DemoSpec", "generate", "iter_events"]
