r"""Convert a PyTorch backbone checkpoint into a Flax (orbax) checkpoint.

  python -m rebll_jax.convert --arch tresnet_m --src tresnet_m.pth \
      --out ckpt/tresnet_m

Reads a timm ``tresnet_m`` / ``resnet*`` state dict, an original-format
(InPlaceABN) TResNet-M checkpoint, or a torchvision ``resnet18/50/101``
state dict, from ``.pth`` / ``.pt`` / ``.bin`` (``torch.load`` with
``weights_only=True``: tensors only, never arbitrary unpickling) or
``.safetensors`` (no torch needed). The conversion is strict: any missing,
unexpected or wrongly shaped backbone tensor stops it with a list, and a
backbone tensor that is not real floating point (complex, integer, bool;
float16/bfloat16/float32/float64 convert) or holds a NaN or inf stops it
with one line naming it. The classifier head is dropped on purpose (a
run's head has one column per dataset class). Train from the result with
``--config.model.arch=ARCH --config.model.init_from=OUT``. ``OUT/info.json``
records the sha256 of every array file written, verified on every load.

User mistakes end with a message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys

from rebll_jax.errors import UserError
from rebll_jax.models import pretrained

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")


def read_state_dict(path: str):
  """The object stored in ``path`` (a state dict, possibly wrapped)."""
  if not os.path.isfile(path):
    raise UserError(f"--src {path}: no such file")
  if path.endswith(".safetensors"):
    from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return load_file(path)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
      raise UserError(f"--src {path}: not a readable safetensors file "
                      f"({e})") from None
  if not path.endswith(TORCH_SUFFIXES):
    raise UserError(f"--src {path}: unknown file type; expected .safetensors "
                    f"or one of {', '.join(TORCH_SUFFIXES)}")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f"--src {path}: reading PyTorch files needs torch "
                    "(pip install torch), or save the weights as "
                    ".safetensors") from None
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    # torch's message is long; keep what names the culprit.
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    detail = [l for l in lines if l.startswith("Unsupported")]
    why = (f"it pickles a {found.group(1)} object" if found else
           f"{type(e).__name__}: {detail[0] if detail else lines[-1]}"
           if lines else type(e).__name__)
    raise UserError(
        f"--src {path}: torch.load(weights_only=True) refused it ({why}). "
        "Only tensor state dicts are read; if it holds a pickled model, "
        "re-save it with torch.save(model.state_dict(), path)") from None


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def convert_file(arch: str, src: str, out: str, overwrite: bool = False):
  """Converts ``src`` into ``out``; returns the info dict written there."""
  if arch not in pretrained.BACKBONES:
    raise UserError(f"--arch {arch}: unknown; valid: "
                    f"{', '.join(sorted(pretrained.BACKBONES))}")
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out {out} is a file, not a directory")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise UserError(f"--out {out} exists and is not empty; choose another "
                    "directory or pass --overwrite")
  if os.path.isdir(out) and overwrite:
    # --overwrite replaces a converted checkpoint (or a half-written one),
    # never a folder holding anything else: it is removed whole.
    others = sorted(set(os.listdir(out)) - {pretrained.INFO_FILE,
                                            pretrained.VARIABLES_DIR})
    if others:
      raise UserError(f"--out {out} is not a converted checkpoint (it holds "
                      f"{', '.join(others[:3])}); --overwrite only replaces "
                      "the output of a previous conversion")
  obj = read_state_dict(src)
  try:
    variables, report = pretrained.convert_state_dict(arch, obj)
  except pretrained.ConversionError as e:
    raise UserError(f"{src}: {e}") from None
  info = dict(report, source=os.path.abspath(src), source_sha256=sha256(src),
              converter="rebll_jax.convert")
  if overwrite and os.path.isdir(out):
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(out)
  return pretrained.save_converted(out, variables, info)


def summary(info: dict, out: str) -> str:
  lines = [f"read {info['source']} ({info['format']} format)",
           f"mapped {info['num_tensors']} tensors "
           f"({info['num_values']:,} values) onto {info['arch']}"]
  for what, keys in sorted(info["dropped"].items()):
    shown = ": " + ", ".join(keys) if what == "classifier head" else ""
    lines.append(f"dropped {len(keys)} {what}{shown}")
  if "classifier head" not in info["dropped"]:
    lines.append("no classifier head in the source (nothing to drop)")
  lines.append(f"wrote {os.path.abspath(out)}; train with "
               f"--config.model.arch={info['arch']} "
               f"--config.model.init_from={os.path.abspath(out)}")
  return "\n".join(lines)


def parse_args(argv):
  p = argparse.ArgumentParser(
      prog="python -m rebll_jax.convert", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", required=True,
                 choices=sorted(pretrained.BACKBONES),
                 help="target architecture")
  p.add_argument("--src", required=True,
                 help="PyTorch checkpoint: .pth/.pt/.bin or .safetensors")
  p.add_argument("--out", required=True,
                 help="directory to write the converted checkpoint into")
  p.add_argument("--overwrite", action="store_true",
                 help="replace --out if it already exists")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    info = convert_file(args.arch, args.src, args.out, args.overwrite)
  except UserError as e:
    print(f"convert: error: {e}", file=sys.stderr)
    return 2
  print(summary(info, args.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
