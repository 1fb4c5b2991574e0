"""Prints what a re-executed entry point sees (used by test_runtime.py)."""
import os
import sys

print("GLIBC_TUNABLES=" + os.environ.get("GLIBC_TUNABLES", ""))
print(f"START={os.environ.get('FASHION_JAX_PROCESS_START')}")
print(f"SAFE_PATH={sys.flags.safe_path} NO_USER_SITE={sys.flags.no_user_site} UTF8={sys.flags.utf8_mode}")
print(f"UNBUFFERED={type(sys.stdout.buffer).__name__ == 'FileIO'}")
