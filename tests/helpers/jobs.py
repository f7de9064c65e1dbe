"""Module-level job functions for tests that run jobs in spawned worker processes (they must pickle)."""

import os


def worker_pid(_item: object) -> int:
    return os.getpid()
