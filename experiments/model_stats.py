"""Parameter counts and forward cost per image of the backbones.

  python experiments/model_stats.py [--size 224] [--num_classes 1000]

Counts parameters (float32 ``params``, 1000-class head unless told
otherwise; BatchNorm running statistics are not parameters) and forward
multiply-accumulates (MACs) per image at ``--size``, by walking the jaxpr
of ``module.apply`` and summing over convolutions and matmuls. FLOPs are
reported as 2 x MACs. Most published "FLOPs" for these models are MACs
in this sense (ResNet-50's "4.1 GFLOPs" are 4.1 GMACs). XLA's own estimate
(``cost_analysis``) is shown too: it counts 2 per MAC and adds the
elementwise work (norms, activations, pooling, blur).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rebll_jax.models import pretrained  # pylint: disable=g-import-not-at-top
from experiments.cli_checks import positive_int, refuse_repeats  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

# Published figures: params (M) and GMACs at 224, 1000 classes. ResNets:
# torchvision's model docs (whose "GFLOPS" column counts MACs); TResNet-M:
# timm's model card (31.4 M, 5.7 GMACs).
PUBLISHED = {
    "resnet18": (11.69, 1.81),
    "resnet50": (25.56, 4.09),
    "resnet101": (44.55, 7.80),
    "tresnet_m": (31.4, 5.7),
}


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
        yield v.jaxpr  # ClosedJaxpr
      elif hasattr(v, "eqns"):
        yield v


def count_macs(jaxpr) -> int:
  """Multiply-accumulates of every conv and dot_general in ``jaxpr``,
  our CPU kernels' convolutions (``ffi_call``, conv_impl=kernel) included."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    target = eqn.params.get("target_name", "") if name == "ffi_call" else ""
    if target == "rebll_conv_forward":  # (x padded, w HWIO) -> y
      kh, kw, cin, _ = eqn.invars[1].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * kh * kw * cin
    elif target == "rebll_conv_filter_grad":  # (x, g) -> dw over n*oh*ow
      n, oh, ow, _ = eqn.invars[1].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * n * oh * ow
    elif target:
      raise ValueError(f"count_macs: unknown FFI target {target!r}")
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out = eqn.outvars[0].aval.shape
      out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += math.prod(out) * math.prod(rhs) // out_features
    elif name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs[d] for d in lhs_contract)
    for sub in _sub_jaxprs(eqn):
      total += count_macs(sub)
  return total


def stats(arch: str, size: int, num_classes: int) -> dict:
  module = pretrained.build(arch, num_classes)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
  params = sum(math.prod(p.shape) for p in jax.tree.leaves(
      variables["params"]))
  stats_count = sum(math.prod(p.shape) for p in jax.tree.leaves(
      variables["batch_stats"]))
  apply = lambda v, x: module.apply(v, x, train=False)
  macs = count_macs(jax.make_jaxpr(apply)(variables, x).jaxpr)
  cost = jax.jit(apply).lower(variables, x).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"arch": arch, "params": params, "batch_stats": stats_count,
          "macs": macs, "xla_flops": float(cost.get("flops", np.nan))}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", type=positive_int, default=224)
  p.add_argument("--num_classes", type=positive_int, default=1000)
  p.add_argument("--archs", default=",".join(pretrained.BACKBONES))
  args = p.parse_args(argv)
  archs = args.archs.split(",")
  unknown = [a for a in archs if a not in pretrained.BACKBONES]
  if unknown:
    p.error(f"--archs: unknown {unknown}; valid: "
            f"{', '.join(sorted(pretrained.BACKBONES))}")
  refuse_repeats(p, "--archs", archs)  # its row would print twice
  print(f"input {args.size}x{args.size}, {args.num_classes}-class head, "
        "per image; MACs = multiply-accumulates, FLOPs = 2 x MACs")
  head = (f"{'arch':<10} {'params (M)':>10} {'published':>9} "
          f"{'GMACs':>7} {'published':>9} {'GFLOPs':>7} {'XLA GFLOPs':>10}")
  print(head)
  print("-" * len(head))
  for arch in archs:
    try:
      s = stats(arch, args.size, args.num_classes)
    except ValueError as e:  # a size the model does not take (TResNet: 4k)
      p.error(f"{arch} at --size {args.size}: {' '.join(str(e).split())}")
    pub_p, pub_m = PUBLISHED.get(arch, (np.nan, np.nan))
    if args.size != 224 or args.num_classes != 1000:
      pub_p, pub_m = np.nan, np.nan  # published for 224 and 1000 classes
    print(f"{arch:<10} {s['params'] / 1e6:>10.2f} {pub_p:>9.2f} "
          f"{s['macs'] / 1e9:>7.2f} {pub_m:>9.2f} "
          f"{2 * s['macs'] / 1e9:>7.2f} {s['xla_flops'] / 1e9:>10.2f}")


if __name__ == "__main__":
  main()
