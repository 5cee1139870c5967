"""The PyTorch -> Flax converter: formats, refusals, CLI, loading.

State dicts here are random numpy arrays with the exact timm/torchvision
names and shapes (generated from the Flax modules), so most tests need no
torch; forward parity with real PyTorch models is in
test_models_backbones.py.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rebll_jax import convert
from rebll_jax.errors import UserError
from rebll_jax.models import pretrained, restore_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_shape(flax_shape):
  return pretrained._flax_shape_inv(flax_shape)  # pylint: disable=protected-access


def fake_state_dict(arch, num_classes=1000, seed=0):
  """timm/torchvision-named random float32 tensors, plus BN counters."""
  rng = np.random.RandomState(seed)
  sd = {}
  for key, (_, _, shape, _) in pretrained.expected_tensors(
      arch, num_classes).items():
    sd[key] = rng.standard_normal(torch_shape(shape)).astype(np.float32)
    if key.endswith("running_var"):
      sd[key] = np.abs(sd[key]) + 0.5
      sd[key[:-len("running_var")] + "num_batches_tracked"] = np.array(
          7, np.int64)
  return sd


def to_original_tresnet(sd):
  """timm TResNet names -> the original InPlaceABN ones (inverse of timm's
  filter): scale w stored as +-(w - eps), anti-aliased convs nested."""
  rng = np.random.RandomState(1)
  out = {}
  for key, value in sd.items():
    if key.endswith("num_batches_tracked"):
      continue  # InPlaceABN keeps no counter
    if key.endswith(".bn.weight"):
      value = np.abs(value) + 0.1  # a valid |w| + eps scale
      sd[key] = value
      value = (value - pretrained.ABN_EPS) * rng.choice([-1, 1], value.shape)
    m = re.match(r"body\.layer(\d)\.0\.(conv\d)\.(conv|bn)\.(.*)", key)
    blurred = m and m.group(1) != "1" and m.group(2) == (
        "conv1" if m.group(1) == "2" else "conv2")
    part = "0" if ".conv." in key else "1"
    if blurred:  # Sequential(Sequential(conv, abn), anti_alias)
      key = re.sub(r"\.(conv\d)\.(conv|bn)\.", rf".\1.0.{part}.", key)
    else:
      key = re.sub(r"\.(conv\d|downsample\.1)\.(conv|bn)\.", rf".\1.{part}.",
                   key)
    out[key] = value
  # A remove_aa_jit model also stores its fixed blur filter.
  out["body.layer2.0.conv1.1.op.filt"] = np.broadcast_to(
      np.outer([1, 2, 1], [1, 2, 1])[None, None] / 16.0, (128, 1, 3, 3))
  return {"epoch": 5, "model": out}


def same_tree(a, b):
  fa = jax.tree_util.tree_leaves_with_path(a)
  fb = dict(jax.tree_util.tree_leaves_with_path(b))
  assert len(fa) == len(fb)
  for path, leaf in fa:
    np.testing.assert_allclose(leaf, fb[path], rtol=1e-6, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def r18():
  return fake_state_dict("resnet18")


# ------------------------------------------------------------- formats ---

def test_original_tresnet_equals_timm_format():
  timm = fake_state_dict("tresnet_m", num_classes=80)
  original = to_original_tresnet(timm)  # also fixes timm's bn weights > 0
  assert "body.layer3.0.conv2.0.0.weight" in original["model"]
  assert "body.layer2.0.downsample.1.1.running_var" in original["model"]
  v_timm, r_timm = pretrained.convert_state_dict("tresnet_m", timm)
  v_orig, r_orig = pretrained.convert_state_dict("tresnet_m", original)
  assert (r_timm["format"], r_orig["format"]) == (
      "timm", "original-inplace-abn")
  assert r_timm["num_tensors"] == r_orig["num_tensors"] == 372
  assert "blur filters (fixed, not parameters)" in r_orig["dropped"]
  same_tree(v_timm, v_orig)


def test_layout_transposes_and_head_is_dropped(r18):
  variables, report = pretrained.convert_state_dict("resnet18", r18)
  assert "fc" not in variables["params"]
  assert report["dropped"]["classifier head"] == [
      "fc.bias [1000]", "fc.weight [1000, 512]"]
  assert len(report["dropped"]["num_batches_tracked counters"]) == 20
  np.testing.assert_array_equal(
      variables["params"]["layer2_0"]["conv2"]["kernel"],
      r18["layer2.0.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      variables["batch_stats"]["layer4_0"]["downsample_1"]["var"],
      r18["layer4.0.downsample.1.running_var"])
  kept, _ = pretrained.convert_state_dict("resnet18", r18, keep_head=True)
  np.testing.assert_array_equal(kept["params"]["fc"]["kernel"],
                                r18["fc.weight"].T)


def test_unwraps_state_dict_and_dataparallel_prefix(r18):
  wrapped = {"state_dict": {"module." + k: v for k, v in r18.items()},
             "epoch": 3}
  a, _ = pretrained.convert_state_dict("resnet18", wrapped)
  b, _ = pretrained.convert_state_dict("resnet18", r18)
  same_tree(a, b)


# ------------------------------------------------------------ refusals ---

def refusal(arch, sd):
  with pytest.raises(pretrained.ConversionError) as e:
    pretrained.convert_state_dict(arch, sd)
  return str(e.value)


def test_refuses_missing_tensor(r18):
  sd = dict(r18)
  del sd["layer3.1.bn2.running_mean"]
  msg = refusal("resnet18", sd)
  assert "missing (1)" in msg and "layer3.1.bn2.running_mean" in msg
  assert "nothing was converted" in msg


def test_refuses_unexpected_tensor(r18):
  sd = dict(r18, **{"layer5.0.conv1.weight": np.zeros((1, 1, 1, 1))})
  msg = refusal("resnet18", sd)
  assert "unexpected (1)" in msg and "layer5.0.conv1.weight" in msg


def test_refuses_wrong_shape(r18):
  sd = dict(r18, **{"layer1.0.conv1.weight": np.zeros((64, 64, 1, 1))})
  msg = refusal("resnet18", sd)
  assert ("layer1.0.conv1.weight: got [64, 64, 1, 1], expected "
          "[64, 64, 3, 3]") in msg


def test_refuses_wrong_arch_with_hint(r18):
  msg = refusal("resnet50", r18)
  assert "hint: it looks like a resnet18 (--arch resnet18)" in msg
  assert "TResNet" in refusal("resnet50", {"body.conv1.0.weight": np.ones(1)})
  assert "looks like a resnet18" in refusal("tresnet_m", r18)


@pytest.mark.parametrize("obj,why", [
    ([np.ones(3)], "holds a list"),
    ({}, "empty"),
    ({"conv1.weight": np.ones(3), "epoch": 3}, "entries are not tensors"),
])
def test_refuses_non_state_dicts(obj, why):
  assert why in refusal("resnet18", obj)


# ------------------------------------------------------- CLI and loading ---

def run_cli(capsys, *args):
  rc = convert.main(list(args))
  out, err = capsys.readouterr()
  return rc, out, err


def test_cli_safetensors_round_trip_and_load(tmp_path, capsys, r18):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  src = str(tmp_path / "r18.safetensors")
  save_file(r18, src)
  out = str(tmp_path / "ckpt")
  rc, stdout, _ = run_cli(capsys, "--arch", "resnet18", "--src", src,
                          "--out", out)
  assert rc == 0
  assert "mapped 100 tensors" in stdout
  assert "dropped 2 classifier head: fc.bias [1000], fc.weight [1000, 512]" \
      in stdout
  info = json.load(open(os.path.join(out, "info.json")))
  assert info["source"] == src and info["arch"] == "resnet18"
  assert len(info["source_sha256"]) == 64

  # load_pretrained: backbone replaced, fresh 7-class head kept.
  module = pretrained.build("resnet18", 7)
  x = jnp.zeros((1, 32, 32, 3))
  # Shapes from eval_shape, filled with a marker (a real init compiles RNG).
  fresh = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype),
                       jax.eval_shape(module.init, jax.random.PRNGKey(0), x))
  loaded, linfo = pretrained.load_pretrained(fresh, out, "resnet18")
  assert linfo["source"] == src and linfo["num_loaded"] == 100
  np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"],
                                fresh["params"]["fc"]["kernel"])
  np.testing.assert_array_equal(
      loaded["params"]["conv1"]["kernel"],
      r18["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded["batch_stats"]["bn1"]["mean"],
                                r18["bn1.running_mean"])

  # restore_backbone: features from the converted weights, empty logits.
  module, variables = restore_backbone("resnet18", out)
  y = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
  assert y["features"].shape == (1, 512) and y["logits"].shape == (1, 0)

  # Refusals when loading into the wrong model.
  with pytest.raises(ValueError, match="holds a converted 'resnet18'"):
    pretrained.load_pretrained(fresh, out, "resnet50")
  broken = {"params": dict(fresh["params"]),
            "batch_stats": fresh["batch_stats"]}
  broken["params"]["extra"] = {"kernel": jnp.zeros(3)}
  with pytest.raises(ValueError, match=r"missing from checkpoint \(1\)"):
    pretrained.load_pretrained(broken, out, "resnet18")

  # An existing output directory is not overwritten silently.
  rc, _, err = run_cli(capsys, "--arch", "resnet18", "--src", src,
                       "--out", out)
  assert rc == 2 and "exists and is not empty" in err


def test_overwrite_replaces_only_a_converted_checkpoint(tmp_path, capsys,
                                                        r18):
  # --out naming the folder that holds the source (and other files) once
  # removed that folder whole, the source with it, and exited 0.
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "weights"
  folder.mkdir()
  src = folder / "r18.safetensors"
  save_file(r18, str(src))
  (folder / "notes.txt").write_text("keep me")
  rc, _, err = run_cli(capsys, "--arch", "resnet18", "--src", str(src),
                       "--out", str(folder), "--overwrite")
  assert rc == 2 and "is not a converted checkpoint" in err
  assert "notes.txt" in err and len(err.strip().splitlines()) == 1
  assert src.exists() and (folder / "notes.txt").read_text() == "keep me"
  # A previous conversion, or a half-written one, is replaced.
  out = tmp_path / "ckpt"
  assert run_cli(capsys, "--arch", "resnet18", "--src", str(src),
                 "--out", str(out))[0] == 0
  assert run_cli(capsys, "--arch", "resnet18", "--src", str(src),
                 "--out", str(out), "--overwrite")[0] == 0
  os.remove(out / "info.json")
  assert run_cli(capsys, "--arch", "resnet18", "--src", str(src),
                 "--out", str(out), "--overwrite")[0] == 0
  assert (out / "info.json").exists()


@pytest.mark.parametrize("name,content,why", [
    ("none.pth", None, "no such file"),
    ("w.npz", b"x", "unknown file type"),
    ("bad.safetensors", b"\x00" * 16, "not a readable safetensors file"),
])
def test_cli_file_errors(tmp_path, capsys, name, content, why):
  src = tmp_path / name
  if content is not None:
    src.write_bytes(content)
  rc, _, err = run_cli(capsys, "--arch", "resnet18", "--src", str(src),
                       "--out", str(tmp_path / "o"))
  assert rc == 2 and why in err
  assert err.startswith("convert: error:") and "Traceback" not in err


def test_cli_torch_files(tmp_path, capsys, r18):
  torch = pytest.importorskip("torch", reason="reading .pth needs torch")
  sd = {k: torch.from_numpy(v) for k, v in r18.items()}
  src = str(tmp_path / "wrapped.pth")
  torch.save({"state_dict": sd, "epoch": 3}, src)
  rc, stdout, _ = run_cli(capsys, "--arch", "resnet18", "--src", src,
                          "--out", str(tmp_path / "a"))
  assert rc == 0 and "mapped 100 tensors" in stdout
  # A pickled module is refused by weights_only loading, with advice.
  src = str(tmp_path / "module.pth")
  torch.save(torch.nn.Linear(2, 2), src)
  rc, _, err = run_cli(capsys, "--arch", "resnet18", "--src", src,
                       "--out", str(tmp_path / "b"))
  assert rc == 2 and "weights_only=True" in err and "state_dict()" in err
  assert "Linear" in err


def test_cli_entry_point_exit_code_without_traceback(tmp_path):
  src = tmp_path / "x.safetensors"
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({"fc.weight": np.zeros((2, 2), np.float32)}, str(src))
  proc = subprocess.run(
      [sys.executable, "-m", "rebll_jax.convert", "--arch", "tresnet_m",
       "--src", str(src), "--out", str(tmp_path / "o")],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr
  assert "not a TResNet state dict" in proc.stderr
  assert "Traceback" not in proc.stderr and not os.path.exists(
      tmp_path / "o")


# ------------------------------------------- init_from a state-dict file ---

def test_init_from_torchvision_resnet18_pth_in_process(tmp_path):
  """--config.model.init_from=FILE.pth: the PyTorch baseline trainer writes
  ``{'model': state_dict}``; a real torchvision-layout resnet18 saved so
  loads into ours (converted in-process) with equal features and logits."""
  torch = pytest.importorskip("torch", reason="torch is in the test extra")
  from experiments.torch_baseline import models  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  ref = models.resnet18(num_classes=7).eval()
  with torch.no_grad():  # norm statistics away from the identity
    for m in ref.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.2)
        m.running_mean.normal_(0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
  src = str(tmp_path / "resnet18_init.pth")
  torch.save({"model": ref.state_dict()}, src)

  module = pretrained.build("resnet18", 7)
  x = np.random.RandomState(0).rand(2, 32, 32, 3).astype(np.float32)
  fresh = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype),
                       jax.eval_shape(module.init, jax.random.PRNGKey(0), x))
  loaded, info = pretrained.load_pretrained(fresh, src, "resnet18")
  assert info["format"] == "torchvision/timm" and info["num_loaded"] == 100
  assert info["source"] == src and info["source_sha256"] == convert.sha256(src)
  assert info["dropped"]["classifier head"] == ["fc.bias [7]",
                                                "fc.weight [7, 512]"]
  # The head of a run stays as initialised ...
  np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"],
                                fresh["params"]["fc"]["kernel"])
  # ... so give it torch's to compare logits end to end (eval mode).
  loaded["params"]["fc"] = {
      "kernel": jnp.asarray(ref.fc.weight.detach().numpy().T),
      "bias": jnp.asarray(ref.fc.bias.detach().numpy())}
  got = jax.jit(lambda v, x: module.apply(v, x, train=False))(loaded, x)
  with torch.no_grad():
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  for key in ("features", "logits"):
    ours = np.asarray(got[key], np.float64)
    theirs = want[key].numpy().astype(np.float64)
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"{key}: max rel err {err:.2e}")
    assert err < 1e-5, (key, err)


def test_init_from_file_refusals_are_value_errors(tmp_path, r18):
  """Every failure is a ValueError (train.py turns it into one error line)."""
  torch = pytest.importorskip("torch", reason="torch is in the test extra")
  module = pretrained.build("resnet18", 3)
  fresh = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                         jnp.zeros((1, 32, 32, 3)))
  # A resnet18 file for a resnet50 model: the conversion's list and hint.
  src = str(tmp_path / "r18.pth")
  torch.save({"model": {k: torch.from_numpy(v) for k, v in r18.items()}}, src)
  with pytest.raises(ValueError, match=r"r18\.pth: the torchvision/timm "
                     r"state dict does not match resnet50") as e:
    pretrained.load_pretrained(fresh, src, "resnet50")
  assert "looks like a resnet18" in str(e.value)
  # A converted backbone that does not fit the model that was built.
  small = jax.eval_shape(pretrained.build("resnet50", 3).init,
                         jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="does not fit the model"):
    pretrained.load_state_dict_file(small, src, "resnet18")
  # A pickled module, refused by weights_only loading; an unknown suffix.
  bad = str(tmp_path / "module.pth")
  torch.save(torch.nn.Linear(2, 2), bad)
  with pytest.raises(ValueError, match=r"module\.pth: torch\.load\("
                     r"weights_only=True\) refused it"):
    pretrained.load_pretrained(fresh, bad, "resnet18")
  odd = tmp_path / "weights.npz"
  odd.write_bytes(b"x")
  with pytest.raises(ValueError, match="unknown file type"):
    pretrained.load_pretrained(fresh, str(odd), "resnet18")
  # A folder that is not a converted checkpoint keeps its old message.
  with pytest.raises(ValueError, match="is not a converted checkpoint"):
    pretrained.load_pretrained(fresh, str(tmp_path), "resnet18")

# ------------------------------------- dtypes and non-finite values ---
# The converter once dropped imaginary parts, cast integer and bool tensors
# to float32 and wrote NaN / inf as is (a NaN backbone then failed as a
# non-finite loss at step 1, exit 1, naming no input).

def _spoiled(r18, how):
  """``r18`` with one defect; -> (state dict, words the refusal must hold)."""
  sd = dict(r18)
  if how == "complex":
    sd["layer1.0.conv1.weight"] = r18["layer1.0.conv1.weight"] * (1 + 1j)
    return sd, ["1 backbone tensor is not real floating point",
                "layer1.0.conv1.weight (complex"]
  if how == "int":  # every float tensor cast to int64: the first 3, a count
    sd = {k: (v * 1000).astype(np.int64) for k, v in r18.items()}
    return sd, ["100 backbone tensors are not real floating point",
                "bn1.bias (int64), bn1.running_mean (int64), "
                "bn1.running_var (int64) and 97 more"]
  if how == "bool":
    sd["bn1.running_var"] = np.ones(64, bool)
    return sd, ["bn1.running_var (bool)"]
  if how == "nan":
    sd["layer1.0.conv1.weight"] = r18["layer1.0.conv1.weight"].copy()
    sd["layer1.0.conv1.weight"][0, 0, 0, 0] = np.nan
    return sd, ["1 backbone tensor holds NaN or inf values: "
                "layer1.0.conv1.weight (1 NaN of 36864 values)"]
  if how == "inf":  # and a float64 beyond float32's range is inf there
    sd["bn1.running_var"] = r18["bn1.running_var"].astype(np.float64)
    sd["bn1.running_var"][:2] = [np.inf, 1e300]
    sd["layer4.1.bn2.bias"] = r18["layer4.1.bn2.bias"].copy()
    sd["layer4.1.bn2.bias"][3] = -np.inf
    return sd, ["2 backbone tensors hold NaN or inf values: "
                "bn1.running_var (2 inf of 64 values), "
                "layer4.1.bn2.bias (1 inf of 512 values)"]
  raise ValueError(how)


SPOILED = ["complex", "int", "bool", "nan", "inf"]


@pytest.mark.parametrize("how", SPOILED)
def test_refuses_non_real_or_non_finite_tensor(r18, how):
  sd, words = _spoiled(r18, how)
  msg = refusal("resnet18", sd)
  assert "\n" not in msg and msg.endswith("nothing was converted"), msg
  for w in words:
    assert w in msg, (w, msg)


def test_refusal_names_both_kinds_and_the_file_names(r18):
  sd, _ = _spoiled(r18, "nan")
  sd["conv1.weight"] = r18["conv1.weight"].astype(np.int32)
  msg = refusal("resnet18", sd)
  assert ("1 backbone tensor is not real floating point (only "
          "float16/bfloat16/float32/float64 convert): conv1.weight (int32); "
          "1 backbone tensor holds NaN or inf values: layer1.0.conv1.weight"
          in msg), msg
  # Wrong names or shapes are still listed first (with the arch hint).
  assert "looks like a resnet18" in refusal("resnet50", sd)
  # An original-format TResNet: named as in the file; |w| of the InPlaceABN
  # scale must not turn a complex w into a real one.
  original = to_original_tresnet(fake_state_dict("tresnet_m", num_classes=80))
  key = "body.layer1.0.conv1.1.weight"
  original["model"][key] = original["model"][key].astype(np.complex64)
  msg = refusal("tresnet_m", original)
  assert f"{key} (complex64)" in msg and "\n" not in msg, msg


def test_accepted_dtypes_counters_and_dropped_head(r18):
  """float16/float64 (and torch's bfloat16, below) convert to float32; the
  int64 num_batches_tracked counters and a dropped head are not checked."""
  sd = {k: v.astype(np.float64) if v.dtype == np.float32 else v
        for k, v in r18.items()}
  sd["conv1.weight"] = r18["conv1.weight"].astype(np.float16)
  sd["fc.weight"] = np.full((1000, 512), np.nan, np.float32)
  sd["fc.bias"] = np.zeros(1000, np.int64)
  assert sd["bn1.num_batches_tracked"].dtype == np.int64
  variables, report = pretrained.convert_state_dict("resnet18", sd)
  assert len(report["dropped"]["num_batches_tracked counters"]) == 20
  leaves = jax.tree.leaves(variables)
  assert {leaf.dtype for leaf in leaves} == {np.dtype(np.float32)}
  assert all(np.isfinite(leaf).all() for leaf in leaves)
  np.testing.assert_array_equal(
      variables["params"]["conv1"]["kernel"],
      r18["conv1.weight"].astype(np.float16).astype(np.float32)
      .transpose(2, 3, 1, 0))
  # keep_head converts the head, so there it is checked.
  assert "fc.weight (512000 NaN of 512000 values)" in str(pytest.raises(
      pretrained.ConversionError, pretrained.convert_state_dict, "resnet18",
      sd, keep_head=True).value)


def _torch_r18():
  """A real PyTorch resnet18 state dict (int64 num_batches_tracked)."""
  torch = pytest.importorskip("torch", reason="torch is in the test extra")
  from experiments.torch_baseline import models  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  sd = models.resnet18().state_dict()
  assert sd["bn1.num_batches_tracked"].dtype == torch.int64
  return torch, sd


def _spoiled_torch(how):
  torch, sd = _torch_r18()
  np_sd, words = _spoiled({k: v.numpy() for k, v in sd.items()}, how)
  return torch, {k: torch.from_numpy(np.array(v)) for k, v in np_sd.items()}, \
      words


@pytest.mark.parametrize("how", ["complex", "int", "bool", "nan"])
def test_cli_refuses_non_real_or_non_finite_pth(tmp_path, capsys, how):
  torch, sd, words = _spoiled_torch(how)
  src = str(tmp_path / f"r18_{how}.pth")
  torch.save({"model": sd}, src)
  out = tmp_path / "out"
  rc, stdout, err = run_cli(capsys, "--arch", "resnet18", "--src", src,
                            "--out", str(out))
  assert rc == 2 and stdout == "" and not out.exists()
  assert err.startswith(f"convert: error: {src}: ")
  assert len(err.strip().splitlines()) == 1, err
  for w in words:
    assert w in err, (w, err)


def test_cli_converts_real_torch_checkpoint_any_real_float_dtype(
    tmp_path, capsys):
  """A real checkpoint (int64 counters) converts, in float32, bfloat16,
  float16 and float64, from .pth and from a bfloat16 .safetensors (read as
  ml_dtypes' bfloat16, which jax registers with numpy)."""
  torch, sd = _torch_r18()
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  want = sd["layer2.0.conv1.weight"].numpy().transpose(2, 3, 1, 0)
  for dtype in ("float32", "bfloat16", "float16", "float64", "st_bfloat16"):
    cast = {k: v.to(getattr(torch, dtype.replace("st_", "")))
            if v.is_floating_point() else v for k, v in sd.items()}
    if dtype.startswith("st_"):
      src = str(tmp_path / f"r18_{dtype}.safetensors")
      save_file(cast, src)
    else:
      src = str(tmp_path / f"r18_{dtype}.pth")
      torch.save({"model": cast}, src)
    out = str(tmp_path / dtype)
    rc, stdout, err = run_cli(capsys, "--arch", "resnet18", "--src", src,
                              "--out", out)
    assert rc == 0, err
    assert "dropped 20 num_batches_tracked counters" in stdout
    got, _ = pretrained.load_converted(out)
    kernel = got["params"]["layer2_0"]["conv1"]["kernel"]
    assert kernel.dtype == np.float32
    tol = {"bfloat16": 1e-2, "float16": 1e-3}.get(dtype.replace("st_", ""), 0)
    np.testing.assert_allclose(kernel, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("how", ["complex", "int", "bool", "nan"])
def test_init_from_file_refuses_non_real_or_non_finite(tmp_path, how):
  torch, sd, words = _spoiled_torch(how)
  src = str(tmp_path / f"r18_{how}.pth")
  torch.save({"model": sd}, src)
  fresh = jax.eval_shape(pretrained.build("resnet18", 3).init,
                         jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError) as e:
    pretrained.load_pretrained(fresh, src, "resnet18")
  msg = str(e.value)
  assert msg.startswith(f"{src}: ") and "\n" not in msg, msg
  for w in words:
    assert w in msg, (w, msg)


def test_init_from_nan_file_stops_the_run_with_one_user_error(
    tmp_path, monkeypatch):
  """The run's own init turns it into one UserError line naming the file
  and the tensor (it used to train, then stop at a non-finite loss)."""
  import types  # pylint: disable=g-import-not-at-top
  from rebll_jax import train  # pylint: disable=g-import-not-at-top
  # Shapes are all the loading needs before it refuses (no init compile).
  monkeypatch.setattr(
      train.models, "init_variables", lambda m, key, size: jax.eval_shape(
          lambda k: m.init(k, jnp.zeros((1, size, size, 3)), train=False),
          key))
  torch, sd, words = _spoiled_torch("nan")
  src = str(tmp_path / "r18_nan.pth")
  torch.save({"model": sd}, src)
  ns = types.SimpleNamespace
  setup = ns(config=ns(data=ns(image_size=32), model=ns(arch="resnet18")),
             model=pretrained.build("resnet18", 3),
             root_key=jax.random.PRNGKey(0), init_from=src)
  with pytest.raises(UserError) as e:
    train._initial_state(setup)  # pylint: disable=protected-access
  msg = str(e.value)
  assert msg.startswith(f"model.init_from={src!r}: {src}: ") and "\n" not in msg
  assert words[0] in msg, msg


# ------------------------------------------------- checksums, init_from ---

@pytest.fixture(scope="module")
def r18_converted(tmp_path_factory, r18):
  out = str(tmp_path_factory.mktemp("r18") / "ckpt")
  variables, report = pretrained.convert_state_dict("resnet18", r18)
  pretrained.save_converted(out, variables, dict(report, source="x"))
  return out


def _array_files(ckpt_dir):
  root = os.path.join(ckpt_dir, pretrained.VARIABLES_DIR)
  return sorted((os.path.getsize(os.path.join(r, f)), os.path.join(r, f))
                for r, _, fs in os.walk(root) for f in fs)


def test_converted_checkpoint_records_every_file_sha256(r18_converted):
  import hashlib  # pylint: disable=g-import-not-at-top
  info = json.load(open(os.path.join(r18_converted, "info.json")))
  root = os.path.join(r18_converted, pretrained.VARIABLES_DIR)
  want = {os.path.relpath(p, root): hashlib.sha256(open(p, "rb").read())
          .hexdigest() for _, p in _array_files(r18_converted)}
  assert info["variables_sha256"] == want and len(want) >= 3


def test_check_init_from_is_cheap_and_names_the_problem(
    r18_converted, tmp_path, monkeypatch):
  # No model is built: building one would fail here.
  monkeypatch.setattr(pretrained, "build", None)
  monkeypatch.setattr(pretrained, "expected_tensors", None)
  pretrained.check_init_from(r18_converted, "resnet18")
  bad_info = tmp_path / "bad_info"
  shutil.copytree(r18_converted, bad_info)
  (bad_info / "info.json").write_text("{arch: resnet18")
  no_arch = tmp_path / "no_arch"
  shutil.copytree(r18_converted, no_arch)
  (no_arch / "info.json").write_text("[1, 2]")
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  for path, arch, why in (
      (r18_converted, "resnet50", "holds a converted 'resnet18' backbone, "
       "but model.arch is 'resnet50'"),
      (r18_converted, "small_resnet", "holds a converted 'resnet18' "
       "backbone, but model.arch is 'small_resnet'"),
      (str(tmp_path / "nope"), "resnet18", "does not exist"),
      (str(a_file), "resnet18", "is a file, not a converted checkpoint"),
      (str(tmp_path), "resnet18", "info.json missing"),
      (str(bad_info), "resnet18", "info.json is not JSON"),
      (str(no_arch), "resnet18", "info.json names no arch")):
    with pytest.raises(UserError) as error:
      pretrained.check_init_from(path, arch)
    message = str(error.value)
    assert message.startswith(f"model.init_from={path!r}: ") and why in message
    assert "\n" not in message


def test_flipped_byte_in_an_array_file_is_refused(r18_converted, tmp_path):
  ckpt = str(tmp_path / "ckpt")
  shutil.copytree(r18_converted, ckpt)
  _, biggest = _array_files(ckpt)[-1]  # the array data, not the metadata
  raw = bytearray(open(biggest, "rb").read())
  raw[len(raw) // 2] ^= 0x01
  open(biggest, "wb").write(bytes(raw))
  why = "fails its sha256 checksum"
  with pytest.raises(UserError, match=why):
    pretrained.check_init_from(ckpt, "resnet18")
  with pytest.raises(UserError, match=why):
    pretrained.load_converted(ckpt)
  with pytest.raises(UserError, match=why):
    restore_backbone("resnet18", ckpt)
  # A deleted file, or one that was not written by the converter.
  os.remove(biggest)
  with pytest.raises(UserError, match="is missing"):
    pretrained.check_init_from(ckpt, "resnet18")
  open(biggest, "wb").write(bytes(raw))
  with pytest.raises(UserError, match="fails its sha256"):
    pretrained.check_init_from(ckpt, "resnet18")


def test_conversion_without_checksum_loads_with_a_warning(
    r18_converted, tmp_path, caplog):
  ckpt = str(tmp_path / "old")
  shutil.copytree(r18_converted, ckpt)
  info = json.load(open(os.path.join(ckpt, "info.json")))
  del info["variables_sha256"]
  json.dump(info, open(os.path.join(ckpt, "info.json"), "w"))
  with caplog.at_level("WARNING"):
    pretrained.check_init_from(ckpt, "resnet18")
  assert "without a checksum" in caplog.text


def test_one_user_error_class():
  assert convert.UserError is UserError
  assert issubclass(pretrained.UserError, ValueError)
