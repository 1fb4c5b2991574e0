"""Fails (exit 1) unless every `name==version` of a requirements file is what is installed.

  python .ci/check_pins.py .ci/colab-tpu.txt

Run with the interpreter of the environment to check, after installing fashion_jax into it:
proof that the install changed none of the runtime's pinned packages.
"""

import importlib.metadata
import re
import sys


def main(path: str) -> int:
  changed, checked = [], 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      match = re.match(r"^\s*([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
      if not match:
        continue
      name, wanted = match.groups()
      checked += 1
      try:
        have = importlib.metadata.version(name)
      except importlib.metadata.PackageNotFoundError:
        have = "not installed"
      if have != wanted:
        changed.append(f"{name}: pinned {wanted}, installed {have}")
  if changed:
    print(f"{len(changed)} of {checked} pinned packages changed:\n  " + "\n  ".join(changed))
    return 1
  print(f"all {checked} pinned packages of {path} are unchanged")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1]))
