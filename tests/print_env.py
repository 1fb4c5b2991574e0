"""Prints what a re-executed entry point sees (used by test_runtime.py)."""
import os

print("GLIBC_TUNABLES=" + os.environ.get("GLIBC_TUNABLES", ""))
print(f"START={os.environ.get('FASHION_JAX_PROCESS_START')}")
