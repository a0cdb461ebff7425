"""Test setup: two forced CPU devices so data parallelism is exercised everywhere.

``--xla_cpu_multi_thread_eigen=false``: with forced host devices on a 2-core machine, a
device blocked in an all-reduce can hold one of the two shared Eigen threads the other
device's matmul needs, and XLA aborts the process after 40 s (a rendezvous deadlock).
Single-threaded ops run each device on its own thread; pytest-xdist supplies the
parallelism instead.
"""

import os

_FLAGS = ("--xla_force_host_platform_device_count=2", "--xla_cpu_multi_thread_eigen=false")
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", "")] +
    [f for f in _FLAGS if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
