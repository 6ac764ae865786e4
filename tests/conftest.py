"""Test setup: 8 virtual CPU devices so sharded code paths run without an accelerator.

The environment variables must be set before jax is imported anywhere.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import this_checkout  # noqa: E402

this_checkout.use()  # the checkout as the `visual_tokenizers` package
