from e2e.harness import procs

__all__ = ["procs"]
