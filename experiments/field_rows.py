r"""How much rows of the field-exact mode move the default experiment.

  python experiments/field_rows.py --seeds 0,1,2 --out workdirs/field_rows \
      [--variants ours,field_augment,widened,ddp2,last_batch,loss_scale] \
      [--workers 2]

RebLL on synthetic B0-C4 (``configs/synthetic.py``, every default), each
variant one row apart from ``ours``:

- ``ours``: the default experiment as it is;
- ``field_augment``: the baseline's augmentation row (issue 11): the host
  ``field`` policy (CutoutPIL + the ``randaugment`` package's policy), no
  flip, cutout 0.5 with a random colour;
- ``widened``: ``protocol.memory_future_labels=ground_truth`` (replay
  exemplars get ground truth on their own block and every later one up to
  the current task);
- ``ddp2``: ``train.ddp_processes=2``, the shipped scripts' two DDP
  processes: BatchNorm statistics over each half of a batch (RebLL's L_cls
  is a mean, which DDP leaves as it is);
- ``last_batch``: ``train.last_batch=keep``, the baseline's
  ``drop_last=False``: each epoch's short last batch trains;
- ``loss_scale``: ``optim.loss_scale=torch_fp16``, the steps the
  baseline's fp16 ``GradScaler`` skips are skipped (the table's last
  column: skipped steps per task, summed over the tasks).

Runs go through ``experiments/method_table.py``'s ``run_one`` (one
subprocess each, workdir ``OUT/VARIANT/b0c4/rebll/seedS``; a finished run is
not run again, and is refused if its config differs from the variant's;
Ctrl-C or SIGTERM stops the runs, keeping their checkpoints: exit 130 / 143).
Prints a markdown table, mean ± std over seeds with the sample std (ddof=1,
``STD_DDOF``; method_table.py's tables use the population std).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import method_table  # noqa: E402  pylint: disable=g-import-not-at-top
from method_table import child_runs  # noqa: E402  pylint: disable=g-import-not-at-top

VARIANTS = {
    "ours": [],
    "field_augment": ["augment.policy=field", "augment.flip=False",
                      "augment.cutout=0.5", "augment.cutout_fill=random"],
    "widened": ["protocol.memory_future_labels=ground_truth"],
    "ddp2": ["train.ddp_processes=2"],
    "last_batch": ["train.last_batch=keep"],
    "loss_scale": ["optim.loss_scale=torch_fp16"],
}
COLUMNS = (("avg mAP", "avg_map"), ("last mAP", "last_map"), ("CF1", "cf1"),
           ("OF1", "of1"), ("forgetting", "forgetting"))


# The std of "mean ± std" over seeds: the sample std, as this table's
# numbers in the README were computed (method_table.py: population).
STD_DDOF = 1


def _cell(values) -> str:
  return method_table._cell(values, ddof=STD_DDOF)  # pylint: disable=protected-access


def _run_jobs(args, jobs):
  with child_runs.pool(args.workers) as pool:
    futures = {pool.submit(method_table.run_one, os.path.join(args.out, v),
                           "b0c4", "rebll", s, VARIANTS[v], False): (v, s)
               for v, s in jobs}
    for future in concurrent.futures.as_completed(futures):
      try:
        workdir, seconds, how = future.result()
      except RuntimeError as e:  # a failed run, or a finished one made
        v, s = futures[future]  # with other flags
        sys.exit(f"error: {v} seed {s}: {e}\n(runs already started finish "
                 "first; rerun the same command to resume)")
      print(f"{futures[future]}: {how} in {seconds:.0f} s ({workdir})",
            flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--out", default="workdirs/field_rows")
  parser.add_argument("--workers", type=method_table.cli_checks.positive_int,
                      default=2)
  args = parser.parse_args(argv)
  seeds = method_table.cli_checks.parse_seeds(parser, args.seeds)
  variants = args.variants.split(",")
  for v in variants:
    if v not in VARIANTS:
      parser.error(f"unknown variant {v!r}; valid: {list(VARIANTS)}")
  # Twice: two concurrent runs in one workdir (the second refused).
  method_table.cli_checks.refuse_repeats(parser, "--variants", variants)
  jobs = [(v, s) for s in seeds for v in variants]
  child_runs.call(lambda: _run_jobs(args, jobs))
  print("\n| variant | seeds | " + " | ".join(c for c, _ in COLUMNS)
        + " | train s/run | skipped steps/run |")
  print("|---|---|" + "---|" * (len(COLUMNS) + 2))
  for v in variants:
    rows = []
    for s in seeds:
      path = os.path.join(args.out, v, "b0c4", "rebll", f"seed{s}",
                          "results.json")
      try:
        rows.append(method_table._read_results(path))  # pylint: disable=protected-access
      except RuntimeError as e:
        sys.exit(f"error: {e}")
    cells = [_cell([r[key] for r in rows]) for _, key in COLUMNS]
    seconds = _cell([sum(t["train_seconds"] for t in r["tasks"])
                     for r in rows])
    skipped = [sum(t.get("skipped_steps", 0) for t in r["tasks"])
               for r in rows if "skipped_steps" in r["tasks"][0]]
    print(f"| {v} | {len(seeds)} | " + " | ".join(cells)
          + f" | {seconds} | {_cell(skipped) if skipped else '–'} |")
  print("\n" + method_table.std_note(STD_DDOF))


if __name__ == "__main__":
  main()
