"""PyTorch state dicts -> Flax variables, and loading converted backbones.

Conversion is strict by design: every backbone tensor of the target
architecture must be present with the right shape and nothing else may be
left over (a peer codebase loads with ``strict=False`` and trains from
random weights without noticing), and every one must be real floating point
(float16/bfloat16/float32/float64) with finite values: a complex, integer or
bool tensor, or a NaN or inf, is refused by name instead of losing its
imaginary part, being cast, or surfacing as a non-finite loss at step 1.
Only three things are dropped, and the report says so: the classifier head
(the head of a run has one column per dataset class and is initialised
fresh), ``num_batches_tracked`` counters (int64, not checked), and the fixed
blur filters some original TResNet checkpoints store.

Names map by rule: the Flax modules are named after the PyTorch keys with
'.' written as '_', so ``layer1_0/conv1/kernel`` <-> ``layer1.0.conv1.weight``.
A converted checkpoint is a directory with ``info.json`` (arch, source file
and its sha256, format, counts, and the sha256 of every file under
``variables/``) and ``variables/`` (orbax; ``params`` and ``batch_stats`` of
the backbone, float32). Loading verifies those checksums first, so a flipped
byte in an array file is refused instead of silently altering a kernel;
``check_init_from`` runs the same checks without building a model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from rebll_jax.errors import UserError
from rebll_jax.models import resnet, tresnet

log = logging.getLogger(__name__)

# name -> factory(num_classes, dtype) -> nn.Module
BACKBONES = {
    "resnet18": functools.partial(resnet.resnet, "resnet18"),
    "resnet50": functools.partial(resnet.resnet, "resnet50"),
    "resnet101": functools.partial(resnet.resnet, "resnet101"),
    "tresnet_m": tresnet.tresnet_m,
}

INFO_FILE = "info.json"
CHECKSUM_KEY = "variables_sha256"  # info.json: {file under variables/: sha256}
VARIABLES_DIR = "variables"
ABN_EPS = 1e-5  # InPlaceABN's effective norm scale is |w| + eps


class ConversionError(ValueError):
  """A state dict that does not match the architecture (message lists why)."""


def build(arch: str, num_classes: int, dtype=jnp.float32):
  if arch not in BACKBONES:
    raise ValueError(f"unknown arch {arch!r}; valid: {sorted(BACKBONES)}")
  return BACKBONES[arch](num_classes, dtype)


def arch_factory(arch: str):
  """An ``ARCHS`` registry entry: factory(model_cfg, num_classes, dtype)."""
  return lambda cfg, num_classes, dtype: build(arch, num_classes, dtype)


# ------------------------------------------------------------ name rules ---

def _torch_key(collection: str, path: tuple[str, ...]) -> str:
  module = ".".join(p.replace("_", ".") for p in path[:-1])
  leaf = path[-1]
  if collection == "batch_stats":
    leaf = {"mean": "running_mean", "var": "running_var"}[leaf]
  else:
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
  return f"{module}.{leaf}"


def _to_flax(value: np.ndarray, flax_ndim: int) -> np.ndarray:
  if flax_ndim == 4:  # conv OIHW -> HWIO
    return value.transpose(2, 3, 1, 0)
  if flax_ndim == 2:  # linear (out, in) -> (in, out)
    return value.T
  return value


def _flax_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The Flax shape a PyTorch tensor of ``shape`` becomes."""
  if len(shape) == 4:
    return (shape[2], shape[3], shape[1], shape[0])
  return tuple(reversed(shape)) if len(shape) == 2 else tuple(shape)


@functools.lru_cache(maxsize=None)
def expected_tensors(arch: str, num_classes: int = 1000):
  """torch key -> (collection, flax path, flax shape, is_head); shapes only."""
  module = build(arch, num_classes)
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0),
                          jnp.zeros((1, 64, 64, 3)), train=False))
  out = {}
  for collection, tree in shapes.items():
    for path, leaf in flax.traverse_util.flatten_dict(tree).items():
      key = _torch_key(collection, path)
      out[key] = (collection, path, tuple(leaf.shape),
                  path[0] == module.head_name)
  return out


# --------------------------------------------------------- source formats ---

def unwrap(obj: Any) -> dict[str, Any]:
  """The state dict inside a loaded checkpoint object (or ConversionError)."""
  for _ in range(3):  # {"model": {...}}, {"state_dict": {...}}, nested
    if isinstance(obj, Mapping):
      inner = [k for k in ("state_dict", "model") if isinstance(
          obj.get(k), Mapping)]
      if inner:
        obj = obj[inner[0]]
        continue
    break
  if not isinstance(obj, Mapping) or not obj:
    raise ConversionError(
        f"not a state dict: the file holds a {type(obj).__name__}"
        + (" that is empty" if isinstance(obj, Mapping) else "")
        + "; expected a mapping from parameter names to tensors "
        "(e.g. torch.save(model.state_dict(), path))")
  bad = [k for k, v in obj.items()
         if not (hasattr(v, "shape") and hasattr(v, "dtype"))]
  if bad:
    raise ConversionError(
        f"not a state dict: {len(bad)} entries are not tensors, e.g. "
        f"{bad[0]!r} is a {type(obj[bad[0]]).__name__}")
  keys = list(obj)
  if all(k.startswith("module.") for k in keys):  # saved from DataParallel
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return dict(obj)


# The dtypes a backbone tensor may have (all converted to float32). Any other
# (complex, integer, bool, float8, ...) is refused: casting it would drop an
# imaginary part or turn counts and masks into weights without a word.
REAL_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _dtype_name(value) -> str:
  """'float32', 'complex64', 'int64', 'bool', ... (torch or numpy)."""
  return str(value.dtype).replace("torch.", "")


def _is_real_float(value) -> bool:
  return _dtype_name(value) in REAL_FLOAT_DTYPES


def _numpy(value):
  """A real floating tensor as numpy (torch's as float32: numpy has no
  bfloat16); any other dtype is returned as is, to be refused by name once
  the names and shapes have been checked (``value.numpy()`` fails on some,
  e.g. float8, and ``astype`` would hide the others)."""
  if not _is_real_float(value):
    return value
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch
    return value.detach().cpu().float().numpy()
  return np.asarray(value)


def _blur_filter(channels: int) -> np.ndarray:
  f = np.array([1.0, 2.0, 1.0])
  return np.broadcast_to(np.outer(f, f)[None, None] / 16, (channels, 1, 3, 3))


def _from_original_tresnet(sd: dict[str, np.ndarray], dropped: dict,
                           names: dict[str, str]):
  """Original (InPlaceABN) TResNet names -> timm names; norm scale |w| + eps.

  ``names`` receives timm name -> name in the file (for messages).
  """
  out = {}
  for key, value in sd.items():
    if key.endswith(".filt"):  # stored blur filter of remove_aa_jit models
      if (value.ndim != 4 or not _is_real_float(value)
          or not np.allclose(value, _blur_filter(len(value)))):
        raise ConversionError(f"{key}: expected the fixed 3x3 blur filter")
      dropped.setdefault("blur filters (fixed, not parameters)", []).append(key)
      continue
    source = key
    key = re.sub(r"\b(conv\d+)\.0\.0\.", r"\1.conv.", key)
    key = re.sub(r"\b(conv\d+)\.0\.1\.", r"\1.bn.", key)
    key = re.sub(r"\b(conv\d+)\.0\.", r"\1.conv.", key)
    key = re.sub(r"\b(conv\d+)\.1\.", r"\1.bn.", key)
    key = re.sub(r"\bdownsample\.(\d+)\.0\.", r"downsample.\1.conv.", key)
    key = re.sub(r"\bdownsample\.(\d+)\.1\.", r"downsample.\1.bn.", key)
    if key.endswith(".bn.weight") and _is_real_float(value):
      # (any other dtype is refused later: |w| would hide a complex w)
      value = np.abs(value) + ABN_EPS
    out[key] = value
    names[key] = source
  return out


def detect_format(arch: str, keys) -> str:
  keys = set(keys)
  if arch == "tresnet_m":
    if "body.conv1.conv.weight" in keys:
      return "timm"
    if "body.conv1.0.weight" in keys:
      return "original-inplace-abn"
    hint = guess_family(keys)
    raise ConversionError(
        "not a TResNet state dict: it has neither body.conv1.conv.weight "
        "(timm format) nor body.conv1.0.weight (original InPlaceABN format)"
        + (f"; it looks like a {hint} checkpoint" if hint else ""))
  if "conv1.weight" in keys and "bn1.running_var" in keys:
    return "torchvision/timm"
  hint = guess_family(keys)
  raise ConversionError(
      f"not a {arch} state dict: conv1.weight / bn1.running_var not found"
      + (f"; it looks like a {hint} checkpoint" if hint else ""))


def guess_family(keys) -> str:
  keys = set(keys)
  if any(k.startswith("body.conv1.") for k in keys):
    return "TResNet (--arch tresnet_m)"
  if "conv1.weight" in keys:
    blocks = {int(m.group(1)) for k in keys
              if (m := re.match(r"layer3\.(\d+)\.", k))}
    deep = "layer1.0.conv3.weight" in keys
    name = {(False, 2): "resnet18", (False, 6): "resnet34",
            (True, 6): "resnet50", (True, 23): "resnet101"}.get(
                (deep, len(blocks)))
    return f"{name} (--arch {name})" if name else ""
  return ""


# ------------------------------------------------------------ conversion ---

def _listing(title: str, items: list[str], limit: int = 25) -> str:
  lines = [f"  {title} ({len(items)}):"]
  lines += [f"    {s}" for s in items[:limit]]
  if len(items) > limit:
    lines.append(f"    ... and {len(items) - limit} more")
  return "\n".join(lines)


def _first(items: list[str], limit: int = 3) -> str:
  """The first ``limit`` items, then a count: 'a, b, c and 7 more'."""
  shown = ", ".join(items[:limit])
  return shown + (f" and {len(items) - limit} more" if len(items) > limit
                  else "")


def _check_values(tensors: dict[str, Any], names: dict[str, str]):
  """``tensors`` (name -> array as read) as float32, or ConversionError.

  One line naming (the first few of) the tensors that are not real floating
  point and those holding a NaN or an inf (counted after the cast to
  float32, so a float64 beyond its range counts as inf); ``names`` maps a
  name to the one in the file where they differ.
  """
  out, not_real, not_finite = {}, [], []
  for key in sorted(tensors, key=lambda k: names.get(k, k)):
    value, name = tensors[key], names.get(key, key)
    if not _is_real_float(value):
      not_real.append(f"{name} ({_dtype_name(value)})")
      continue
    with np.errstate(over="ignore"):  # float64 beyond float32: inf, refused
      value = np.asarray(value).astype(np.float32)
    if not np.isfinite(value).all():
      nan = int(np.isnan(value).sum())
      inf = value.size - nan - int(np.isfinite(value).sum())
      counts = ", ".join(f"{n} {what}" for n, what in ((nan, "NaN"),
                                                        (inf, "inf")) if n)
      not_finite.append(f"{name} ({counts} of {value.size} values)")
    out[key] = value
  parts = []
  if not_real:
    n = len(not_real)
    parts.append(
        f"{n} backbone tensor{' is' if n == 1 else 's are'} not real floating "
        f"point (only {'/'.join(REAL_FLOAT_DTYPES)} convert): "
        f"{_first(not_real)}")
  if not_finite:
    n = len(not_finite)
    parts.append(f"{n} backbone tensor{' holds' if n == 1 else 's hold'} "
                 f"NaN or inf values: {_first(not_finite)}")
  if parts:
    raise ConversionError("; ".join(parts) + "; nothing was converted")
  return out


def convert_state_dict(arch: str, state_dict: Any, keep_head: bool = False):
  """A PyTorch state dict -> (Flax variables, report).

  ``state_dict`` maps names to torch tensors or numpy arrays, possibly
  wrapped in ``model`` / ``state_dict`` keys. Variables are numpy float32
  ``{"params": ..., "batch_stats": ...}``; without ``keep_head`` the
  classifier head is left out. Raises ConversionError listing every
  missing, unexpected and wrongly shaped tensor; then, in one line, naming
  the converted tensors that are not real floating point (complex, integer,
  bool, ...) or hold a NaN or inf (``num_batches_tracked`` counters, int64,
  and a dropped head are not checked).
  """
  if arch not in BACKBONES:
    raise ConversionError(f"unknown arch {arch!r}; valid: {sorted(BACKBONES)}")
  sd = unwrap(state_dict)
  fmt = detect_format(arch, sd)
  dropped: dict[str, list[str]] = {}
  sd = {k: _numpy(v) for k, v in sd.items()}
  counters = [k for k in sd if k.endswith("num_batches_tracked")]
  if counters:
    dropped["num_batches_tracked counters"] = counters
  sd = {k: v for k, v in sd.items() if k not in counters}
  names: dict[str, str] = {}  # renamed key -> key in the file
  if fmt == "original-inplace-abn":
    sd = _from_original_tresnet(sd, dropped, names)

  expected = expected_tensors(arch)
  head_prefix = "head." if arch == "tresnet_m" else "fc."
  head = {k: v for k, v in sd.items() if k.startswith(head_prefix)}
  num_classes = 1000
  if keep_head:
    w = head.get(head_prefix + ("fc.weight" if arch == "tresnet_m" else
                                "weight"))
    if w is None or w.ndim != 2:
      raise ConversionError(f"keep_head: no 2-d {head_prefix}*weight found")
    num_classes = int(w.shape[0])
    expected = expected_tensors(arch, num_classes)
  else:
    if head:
      dropped["classifier head"] = sorted(
          f"{k} {list(v.shape)}" for k, v in head.items())
    sd = {k: v for k, v in sd.items() if k not in head}
    expected = {k: e for k, e in expected.items() if not e[3]}

  missing = sorted(set(expected) - set(sd))
  unexpected = sorted(set(sd) - set(expected))
  wrong = sorted(
      f"{k}: got {list(sd[k].shape)}, expected "
      f"{list(_flax_shape_inv(expected[k][2]))}"
      for k in set(sd) & set(expected)
      if _flax_shape(sd[k].shape) != expected[k][2])
  if missing or unexpected or wrong:
    parts = [f"the {fmt} state dict does not match {arch}; nothing was "
             f"converted:"]
    hint = guess_family(sd)
    if hint and arch not in hint:
      parts.append(f"  hint: it looks like a {hint} checkpoint")
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("wrong shape", wrong)):
      if items:
        parts.append(_listing(title, items))
    raise ConversionError("\n".join(parts))

  values = _check_values({k: sd[k] for k in expected}, names)
  flat = {}
  for key, (collection, path, shape, _) in expected.items():
    value = _to_flax(values[key], len(shape))
    flat[(collection,) + path] = np.ascontiguousarray(value)
  variables = flax.traverse_util.unflatten_dict(flat)
  report = {
      "arch": arch, "format": fmt, "num_tensors": len(expected),
      "num_values": int(sum(v.size for v in flat.values())),
      "dropped": dropped, "num_classes": num_classes if keep_head else 0,
  }
  return variables, report


def _flax_shape_inv(shape):
  """The PyTorch shape whose Flax shape is ``shape`` (for messages)."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(reversed(shape)) if len(shape) == 2 else tuple(shape)


# ------------------------------------------------- converted checkpoints ---

def _file_digests(variables_dir: str) -> dict[str, str]:
  """sha256 of every file under ``variables_dir``, by '/'-joined relpath."""
  out = {}
  for root, dirs, files in os.walk(variables_dir):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          h.update(chunk)
      rel = os.path.relpath(path, variables_dir).replace(os.sep, "/")
      out[rel] = h.hexdigest()
  return out


def save_converted(out_dir: str, variables, info: dict) -> dict:
  """Writes ``out_dir/variables`` (orbax) and ``out_dir/info.json``.

  ``info.json`` also records the sha256 of every file orbax wrote
  (``variables_sha256``), checked whenever the backbone is loaded. Returns
  the info written.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(out_dir, VARIABLES_DIR), variables)
  ckptr.wait_until_finished()
  info = dict(info, **{CHECKSUM_KEY: _file_digests(
      os.path.join(out_dir, VARIABLES_DIR))})
  with open(os.path.join(out_dir, INFO_FILE), "w") as f:
    json.dump(info, f, indent=2, sort_keys=True)
  return info


def read_info(ckpt_dir: str) -> dict:
  """``info.json`` of a converted checkpoint (UserError if it is not one)."""
  hint = "make one with python -m rebll_jax.convert"
  if not os.path.exists(ckpt_dir):
    raise UserError(f"{ckpt_dir} does not exist; {hint}")
  if not os.path.isdir(ckpt_dir):
    raise UserError(f"{ckpt_dir} is a file, not a converted checkpoint "
                    f"directory; {hint}")
  path = os.path.join(ckpt_dir, INFO_FILE)
  if not os.path.isfile(path):
    raise UserError(f"{ckpt_dir} is not a converted checkpoint ({INFO_FILE} "
                    f"missing); {hint}")
  try:
    with open(path, "rb") as f:
      info = json.loads(f.read())
  except (ValueError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not JSON ({' '.join(str(e).split())}); "
                    "convert the backbone again") from None
  if not isinstance(info, dict) or not isinstance(info.get("arch"), str):
    raise UserError(f"{path} names no arch; convert the backbone again")
  if not os.path.isdir(os.path.join(ckpt_dir, VARIABLES_DIR)):
    raise UserError(f"{ckpt_dir} has no {VARIABLES_DIR}/ folder; convert "
                    "the backbone again")
  return info


def verify_checksum(ckpt_dir: str, info: dict) -> None:
  """Every array file is as written at convert time (UserError otherwise).

  Conversions made before checksums were recorded load with a warning.
  """
  want = info.get(CHECKSUM_KEY)
  if want is None:
    log.warning("%s was converted without a checksum (an older rebll_jax): "
                "its arrays cannot be verified; convert it again to protect "
                "it", ckpt_dir)
    return
  redo = "altered or damaged since conversion; convert the backbone again"
  if not isinstance(want, dict):
    raise UserError(f"{ckpt_dir}/{INFO_FILE}: {CHECKSUM_KEY} is not a "
                    "mapping of files to sha256")
  got = _file_digests(os.path.join(ckpt_dir, VARIABLES_DIR))
  for rel in sorted(set(want) | set(got)):
    where = f"{ckpt_dir}/{VARIABLES_DIR}/{rel}"
    if rel not in got:
      raise UserError(f"{where} is missing: {redo}")
    if rel not in want:
      raise UserError(f"{where} was not written by the converter: {redo}")
    if got[rel] != want[rel]:
      raise UserError(f"{where} fails its sha256 checksum: {redo}")


def check_init_from(path: str, arch: str) -> None:
  """Cheap checks of ``model.init_from`` before anything is built.

  The folder exists, ``info.json`` parses, its arch is ``arch`` and every
  array file passes its checksum. Any arch may load a folder of its own
  (``rebll_jax.upstream`` writes ``small_resnet`` ones); converting a
  PyTorch file is what needs ``BACKBONES``. Builds no model and restores no
  array (it hashes the files: 0.11 s for resnet50's 87 MB, cached). Raises
  UserError, one line.
  """
  try:
    info = read_info(path)
    if info["arch"] != arch:
      raise UserError(f"{path} holds a converted {info['arch']!r} backbone, "
                      f"but model.arch is {arch!r}")
    verify_checksum(path, info)
  except UserError as e:
    raise UserError(f"model.init_from={path!r}: {e}") from None


def check_init_from_file(path: str, arch: str) -> None:
  """A PyTorch file as ``model.init_from`` (converted at init) needs an arch
  that converts; UserError, one line, before anything is built."""
  from rebll_jax import convert  # pylint: disable=g-import-not-at-top
  suffixes = (".safetensors", *convert.TORCH_SUFFIXES)
  if not path.endswith(suffixes):
    raise UserError(
        f"model.init_from={path!r} is a file of unknown type; give a folder "
        "of converted weights (python -m rebll_jax.convert) or a PyTorch "
        f"state dict ({', '.join(suffixes)})")
  if arch not in BACKBONES:
    raise UserError(
        f"model.init_from={path!r} is a PyTorch file, and model.arch "
        f"{arch!r} has no PyTorch counterpart to convert it for (those "
        f"that have: {sorted(BACKBONES)}); {arch} starts from a folder "
        "the upstream pretraining writes (model.init_from=upstream:auto)")


def load_converted(ckpt_dir: str):
  """-> (variables as numpy float32 trees, info dict); checksum verified."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  info = read_info(ckpt_dir)
  verify_checksum(ckpt_dir, info)
  path = os.path.join(os.path.abspath(ckpt_dir), VARIABLES_DIR)
  restored = ocp.StandardCheckpointer().restore(path)
  return jax.tree.map(np.asarray, restored), info


def load_pretrained(variables, ckpt_dir: str, arch: str):
  """Replaces the backbone of freshly initialised ``variables``.

  Every ``params`` / ``batch_stats`` leaf outside the head is taken from the
  converted checkpoint in ``ckpt_dir`` (cast to the fresh leaf's dtype); the
  head, whose width is the dataset's class count, stays as initialised.
  Returns ``(variables, info)``; info records the source file and format.
  Raises UserError (a ValueError) listing every mismatch, and when the
  checkpoint fails its checksum. ``ckpt_dir`` may also be a state-dict
  file, converted in-process (see ``load_state_dict_file``).
  """
  if os.path.isfile(ckpt_dir):
    return load_state_dict_file(variables, ckpt_dir, arch)
  info = read_info(ckpt_dir)
  if info.get("arch") != arch:
    raise UserError(f"{ckpt_dir} holds a converted {info.get('arch')!r} "
                     f"backbone, but model.arch is {arch!r}")
  loaded, info = load_converted(ckpt_dir)
  # small_resnet: the synthetic benchmark's model, pretrained upstream by
  # rebll_jax/upstream.py (not a converted torch architecture).
  head_name = "head" if arch == "small_resnet" else build(arch, 1).head_name
  fresh = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  src = flax.traverse_util.flatten_dict(loaded)
  body = {k for k in fresh
          if k[0] in ("params", "batch_stats")
          and not (k[0] == "params" and k[1] == head_name)}
  missing = sorted("/".join(k) for k in body - set(src))
  unexpected = sorted("/".join(k) for k in set(src) - body)
  wrong = sorted(f"{'/'.join(k)}: checkpoint {list(src[k].shape)}, model "
                 f"{list(fresh[k].shape)}" for k in body & set(src)
                 if tuple(src[k].shape) != tuple(fresh[k].shape))
  if missing or unexpected or wrong:
    parts = [f"converted checkpoint {ckpt_dir} does not fit the {arch} "
             "model:"]
    for title, items in (("missing from checkpoint", missing),
                         ("not in model", unexpected), ("wrong shape", wrong)):
      if items:
        parts.append(_listing(title, items))
    raise UserError("\n".join(parts))
  out = dict(fresh)
  for k in body:
    out[k] = jnp.asarray(src[k], dtype=fresh[k].dtype)
  info = dict(info, ckpt_dir=os.path.abspath(ckpt_dir),
              num_loaded=len(body))
  return flax.traverse_util.unflatten_dict(out), info


def load_state_dict_file(variables, path: str, arch: str):
  """``load_pretrained`` from a PyTorch or safetensors state-dict file.

  The file is converted in-process by the rules of ``python -m
  rebll_jax.convert`` (strict; the classifier head dropped), so e.g. a
  torchvision ``resnet18`` state dict saved as ``{'model': state_dict}`` (the
  PyTorch baseline trainer's wrapper) initialises ``--config.model.arch=
  resnet18`` directly. Every ``params`` / ``batch_stats`` leaf outside the
  head is replaced (cast to the fresh leaf's dtype); the head stays as
  initialised. Returns ``(variables, info)``; info holds the conversion
  report, the source path and its sha256. Raises ValueError (why, or every
  mismatch).
  """
  from rebll_jax import convert  # pylint: disable=g-import-not-at-top
  # (imported here: convert imports this module)
  try:
    obj = convert.read_state_dict(path)
  except convert.UserError as e:
    raise ValueError(str(e).replace(f"--src {path}: ", f"{path}: ", 1)) \
        from None
  try:
    loaded, report = convert_state_dict(arch, obj)
  except ConversionError as e:
    raise ValueError(f"{path}: {e}") from None
  head_name = build(arch, 1).head_name
  fresh = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  src = flax.traverse_util.flatten_dict(loaded)
  body = {k for k in fresh
          if k[0] in ("params", "batch_stats")
          and not (k[0] == "params" and k[1] == head_name)}
  # The conversion already matched the architecture's tensors, so this only
  # fails when the model was built differently (another arch or width).
  mismatched = sorted("/".join(k) for k in body ^ set(src)) + sorted(
      "/".join(k) for k in body & set(src)
      if tuple(src[k].shape) != tuple(fresh[k].shape))
  if mismatched:
    raise ValueError(f"{path}: the converted {arch} backbone does not fit "
                     "the model:\n" + _listing("mismatched", mismatched))
  out = dict(fresh)
  for k in body:
    out[k] = jnp.asarray(src[k], dtype=fresh[k].dtype)
  info = dict(report, source=os.path.abspath(path),
              source_sha256=convert.sha256(path),
              converter="rebll_jax.models.pretrained.load_state_dict_file",
              num_loaded=len(body))
  return flax.traverse_util.unflatten_dict(out), info


def restore_backbone(arch: str, ckpt_dir: str, num_classes: int = 0,
                     dtype=jnp.float32, seed: int = 0):
  """-> (module, variables) of a converted backbone, ready for feature use.

  ``module.apply(variables, images, train=False)`` on NHWC float32 images
  in [0, 1] returns ``{"logits", "features"}``. With ``num_classes=0`` the
  logits are an empty [N, 0] array; otherwise a fresh head (``seed``) is
  added.
  """
  module = build(arch, num_classes, dtype)
  init = lambda: module.init(jax.random.PRNGKey(seed),
                             jnp.zeros((1, 64, 64, 3)), train=False)
  # Without a head every leaf is replaced: shapes are enough.
  fresh = jax.eval_shape(init) if num_classes == 0 else init()
  variables, _ = load_pretrained(fresh, ckpt_dir, arch)
  return module, variables
