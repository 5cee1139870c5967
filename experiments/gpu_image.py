"""The GPU image's packages, as a CPU rehearsal sees them; the carried wheels.

Used by experiments/gpu_check.py (and fetch_gpu_wheels.py): which packages
the GPU image of DEVELOPERS.md has, which ones rebll_jax needs beyond them
(``CARRIED``, brought as wheels), the offline install of those wheels into a
temporary target, and the hiding of every other installed package from the
import system (``hide_modules``) so that a rehearsal on this machine imports
only what the GPU image would have.
"""

from __future__ import annotations

import glob
import importlib
import importlib.machinery
import importlib.metadata
import os
import re
import subprocess
import sys
import zipfile

# What the GPU image has (DEVELOPERS.md); their dependencies come with them.
IMAGE_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
                  "chex", "torch", "torchvision", "timm", "numpy",
                  "scikit-learn", "absl-py", "tqdm", "matplotlib", "pillow",
                  "tensorboard", "pip", "setuptools")
# What a synthetic run needs beyond the image: ml-collections (configs),
# tensorboardX (reporting.py). tensorflow-datasets and pycocotools are
# imported only by the real-data readers, never by a synthetic run.
CARRIED = ("ml-collections", "tensorboardX")  # grain: dropped by the project


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def install_wheels(wheel_dir: str, target: str,
                   packages=CARRIED) -> dict:
  """Installs ``packages`` (the carried ones) from ``wheel_dir`` into
  ``target``.

  Offline (``--no-index``), without dependencies (every one needed is in the
  folder), through pip when this Python has it, else by unpacking the
  compatible wheels (a wheel is a zip of the installed files). Returns what
  was installed; raises RuntimeError naming a missing package.
  """
  os.makedirs(target, exist_ok=True)
  wheels = sorted(glob.glob(os.path.join(wheel_dir, "*.whl")))
  tags = _compatible_tags()
  usable = [w for w in wheels if _wheel_tags(w) & tags]
  names = sorted({_norm(os.path.basename(w).split("-")[0]) for w in usable}
                 & {_norm(p) for p in packages})
  missing = [p for p in packages if _norm(p) not in names]
  if missing:
    raise RuntimeError(f"no wheel for this Python in {wheel_dir} for "
                       f"{missing}: run experiments/fetch_gpu_wheels.py")
  cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
         "--find-links", wheel_dir, "--target", target, "--quiet",
         "--disable-pip-version-check", *names]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          check=False)
    via = "pip"
    if proc.returncode:
      raise RuntimeError(proc.stderr.strip().splitlines()[-1:])
  except (OSError, RuntimeError):
    via = "unzip"
    for w in usable:
      with zipfile.ZipFile(w) as z:
        z.extractall(target)
  return {"installed": names, "via": via, "target": target}


def _compatible_tags() -> set:
  v = f"{sys.version_info.major}{sys.version_info.minor}"
  return {f"py3-none-any", f"py{v}-none-any", f"cp{v}-cp{v}",
          f"cp{v}-abi3", "cp32-abi3", "cp37-abi3", "cp38-abi3", "cp39-abi3",
          "cp310-abi3", "cp311-abi3"}


def _wheel_tags(path: str) -> set:
  """{'py3-none-any'} or {'cp312-cp312'}: python-abi pairs of a wheel name
  (the platform tag is not checked: the folder holds manylinux x86_64)."""
  parts = os.path.basename(path)[:-4].split("-")
  pys, abis = parts[-3].split("."), parts[-2].split(".")
  out = set()
  for py in pys:
    for abi in abis:
      out.add(f"{py}-{abi}" if abi != "none" else f"{py}-none-any")
  return out


def image_closure() -> set:
  """Normalised names of the image's packages and their dependencies, as
  installed here (extras are not followed)."""
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  seen, todo = set(), [_norm(p) for p in IMAGE_PACKAGES]
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    try:
      dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
      continue
    seen.add(name)
    for text in dist.requires or []:
      req = Requirement(text)
      if req.marker and not req.marker.evaluate({"extra": ""}):
        continue
      todo.append(_norm(req.name))
  return seen


def blocked_modules(allowed_dists: set) -> set:
  """Top-level modules whose every providing distribution is not allowed."""
  blocked = set()
  for module, dists in importlib.metadata.packages_distributions().items():
    if module.startswith("_") and module != "_yaml":
      continue
    if not any(_norm(d) in allowed_dists for d in dists):
      blocked.add(module)
  return blocked


class _Hiding:
  """A sys.path entry's finder that does not see some top-level names."""

  def __init__(self, inner, hidden: set):
    self._inner, self._hidden = inner, hidden

  def find_spec(self, fullname, target=None):
    if fullname.split(".")[0] in self._hidden:
      return None  # as if not installed: find_spec probes get None too
    return self._inner.find_spec(fullname, target)

  def invalidate_caches(self):
    if hasattr(self._inner, "invalidate_caches"):
      self._inner.invalidate_caches()

  def __getattr__(self, name):
    return getattr(self._inner, name)


def hide_modules(hidden: set) -> list:
  """Makes ``hidden`` top-level modules invisible in site-packages (the
  rehearsal's GPU image): their imports fail as for a missing package."""
  entries = [p for p in sys.path if p and "site-packages" in p
             and os.path.isdir(p)]
  for entry in entries:
    finder = sys.path_importer_cache.get(entry)
    if finder is None:
      finder = importlib.machinery.FileFinder.path_hook(
          *importlib.machinery._bootstrap_external._get_supported_file_loaders())(entry)  # pylint: disable=protected-access
    if not isinstance(finder, _Hiding):
      sys.path_importer_cache[entry] = _Hiding(finder, hidden)
  importlib.invalidate_caches()
  return entries


def carried_modules() -> set:
  mods = set()
  for module, dists in importlib.metadata.packages_distributions().items():
    if any(_norm(d) in {_norm(c) for c in CARRIED} for d in dists):
      mods.add(module)
  return mods
