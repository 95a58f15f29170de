"""Test-wide settings: two fake CPU devices so sharding code runs as on a multi-device host."""

import os

# Must be set before JAX is imported anywhere in the test session.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
