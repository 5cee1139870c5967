"""Run outputs: metrics.jsonl, TensorBoard events, PNG plots, the table.

Only process 0 writes (multi-host). TensorBoard events come from tensorboardX
(no TensorFlow needed).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np


class Writer:
  """Appends one JSON line per log step and mirrors scalars to TensorBoard.

  ``resumed_step``: the global step the run starts from. A killed run may
  have logged steps past its last checkpoint; the resumed run logs them
  again. metrics.jsonl drops those lines first (``train``); TensorBoard
  is told to hide every earlier event from ``resumed_step + 1`` on
  (tensorboardX's ``purge_step``), so each step shows once.
  """

  def __init__(self, workdir: str, resumed_step: int = 0):
    self.active = jax.process_index() == 0
    self.jsonl = None
    self.tb = None
    if self.active:
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      # File names hold the second and the host only: two launches in one
      # second would write the same file; the pid and step keep them apart.
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                              purge_step=int(resumed_step) + 1,
                              filename_suffix=f".{os.getpid()}."
                                              f"{int(resumed_step)}")

  def write(self, step: int, scalars: dict, **tags):
    if not self.active:
      return
    self.jsonl.write(json.dumps({"step": int(step), **tags, **{
        k: float(v) for k, v in scalars.items()}}) + "\n")
    self.jsonl.flush()
    for k, v in scalars.items():
      self.tb.add_scalar(k, float(v), int(step))

  def close(self):
    if self.active:
      self.jsonl.close()
      self.tb.close()


def save_plots(workdir: str, results: dict):
  """seen_map.png (mAP after each task) and map_matrix.png (heatmap)."""
  if jax.process_index() != 0:
    return
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tasks = results["tasks"]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot([t["task"] for t in tasks], [t["map_seen"] for t in tasks], "o-")
  ax.set_xlabel("after task")
  ax.set_ylabel("mAP on seen classes")
  ax.set_title(f"{results['method']} {results['dataset']} {results['setting']}")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "seen_map.png"), dpi=100)
  plt.close(fig)

  matrix = np.full((len(tasks), len(tasks)), np.nan)
  for t, row in enumerate(results["map_matrix"]):
    matrix[t, :len(row)] = row
  fig, ax = plt.subplots(figsize=(4.5, 4))
  im = ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
  for (i, j), v in np.ndenumerate(matrix):
    if not np.isnan(v):
      ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w",
              fontsize=8)
  ax.set_xlabel("classes of task")
  ax.set_ylabel("after task")
  ticks = range(len(tasks))
  ax.set_xticks(ticks, [str(i + 1) for i in ticks])
  ax.set_yticks(ticks, [str(i + 1) for i in ticks])
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "map_matrix.png"), dpi=100)
  plt.close(fig)


def final_table(results: dict) -> str:
  lines = [f"{results['method']} on {results['dataset']} {results['setting']}",
           f"{'task':>4} {'classes':>8} {'mAP seen':>9} {'steps':>6} "
           f"{'seconds':>8}"]
  for t in results["tasks"]:
    lines.append(f"{t['task']:>4} {len(t['classes']):>8} "
                 f"{t['map_seen']:>9.2f} {t['train_steps']:>6} "
                 f"{t['train_seconds']:>8.1f}")
  lines.append(f"avg mAP {results['avg_map']:.2f} | last mAP "
               f"{results['last_map']:.2f} | CF1 {results['cf1']:.2f} | "
               f"OF1 {results['of1']:.2f} | forgetting "
               f"{results['forgetting']:.2f}")
  return "\n".join(lines)
