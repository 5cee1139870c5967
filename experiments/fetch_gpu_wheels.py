"""Download the wheels the GPU image lacks into experiments/gpu_wheels/.

  python experiments/fetch_gpu_wheels.py [--dest DIR] [--no_local]

Run it where the package registry is reachable (this machine, a laptop),
before carrying the checkout to the GPU machine, which has no network.
For each package of ``gpu_image.CARRIED`` at the version installed here
(else the newest), ``pip download --no-deps --only-binary=:all:`` fetches
the wheel for CPython 3.12 on manylinux x86_64 (the GPU image), and also
the one for this interpreter (``--no_local`` skips it) so the CPU
rehearsal installs the very same packages. The folder is git-ignored; its
total must stay within 60 MiB. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
from experiments import gpu_check, gpu_image  # pylint: disable=g-import-not-at-top

LIMIT_BYTES = 60 * 2**20
GPU_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")


def requirement(name: str) -> str:
  try:
    return f"{name}=={importlib.metadata.version(name)}"
  except importlib.metadata.PackageNotFoundError:
    return name


class FetchError(RuntimeError):
  """pip could not download a wheel (no registry, no such version)."""


def download(req: str, dest: str, python_version: str | None) -> None:
  """``pip download`` of ``req`` into ``dest``; FetchError naming pip's
  last error line if it fails."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
         "--only-binary=:all:", "--disable-pip-version-check", "--quiet",
         "--dest", dest, req]
  if python_version:
    cmd += ["--python-version", python_version, "--implementation", "cp"]
    for plat in PLATFORMS:
      cmd += ["--platform", plat]
  proc = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, text=True)
  if proc.returncode:
    lines = [l.strip() for l in proc.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("ERROR:")] or lines
    last = errors[-1] if errors else "(pip printed nothing)"
    where = f" for Python {python_version}" if python_version else ""
    raise FetchError(f"pip download {req}{where} failed (exit "
                     f"{proc.returncode}): {last}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dest", default=gpu_check.WHEEL_DIR)
  p.add_argument("--no_local", action="store_true",
                 help="only the Python 3.12 wheels (no rehearsal copies)")
  args = p.parse_args(argv)
  try:
    os.makedirs(args.dest, exist_ok=True)
    if not os.access(args.dest, os.W_OK | os.X_OK):
      raise PermissionError(f"{args.dest} is not writable")
  except OSError as e:
    print(f"error: --dest {args.dest}: cannot make or write that folder "
          f"({' '.join(str(e).split())}); choose another", file=sys.stderr)
    return 2
  local = f"{sys.version_info.major}.{sys.version_info.minor}"
  try:
    for name in gpu_image.CARRIED:
      req = requirement(name)
      download(req, args.dest, GPU_PYTHON)
      if not args.no_local and local != GPU_PYTHON:
        download(req, args.dest, None)
  except FetchError as e:
    print(f"error: {' '.join(str(e).split())}; run this where the package "
          "registry is reachable", file=sys.stderr)
    return 1
  wheels = sorted(glob.glob(os.path.join(args.dest, "*.whl")))
  total = sum(os.path.getsize(w) for w in wheels)
  line = {"dest": args.dest, "wheels": [os.path.basename(w) for w in wheels],
          "total_mib": round(total / 2**20, 2),
          "limit_mib": LIMIT_BYTES // 2**20}
  print(json.dumps(line))
  if total > LIMIT_BYTES:
    print(f"error: the wheels take {total / 2**20:.1f} MiB, over the "
          f"{LIMIT_BYTES // 2**20} MiB limit", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
