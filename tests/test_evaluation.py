"""evaluation.Predictor: padding and sharding never change a row's scores."""

import logging

import jax
import numpy as np

from rebll_jax import evaluation, models, parallel, protocol
from rebll_jax.data.base import Source, Split
from tests.helpers import make_config


def test_predict_pads_rows_to_the_mesh_and_keeps_each_row():
  config = make_config(**{"data.image_size": 16, "train.eval_batch": 8})
  model = models.build_model(config.model, 6)
  variables = jax.jit(model.init, static_argnames="train")(
      jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32), train=False)
  images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), np.uint8)
  predictor = evaluation.Predictor(model, config, parallel.make_mesh(8))
  full_scores, full_features = map(np.asarray,
                                   predictor.predict(variables, images))
  scores, features = map(np.asarray, predictor.predict(variables, images[:5]))
  assert scores.shape == (5, 6) and features.shape[0] == 5
  np.testing.assert_allclose(scores, full_scores[:5], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(features, full_features[:5], rtol=1e-6,
                             atol=1e-6)
  # predict_split: batches of eval_batch rows, the last one padded.
  class Split:
    def read_images(self, idx):
      return images[np.asarray(idx)]
  got, _ = predictor.predict_split(variables, Split(), np.array([7, 1, 3]))
  np.testing.assert_allclose(got, full_scores[[7, 1, 3]], rtol=1e-6,
                             atol=1e-7)


def test_a_class_without_test_positives_is_named_once(caplog):
  # Its AP is 0 (the baseline's rule), which pulls every later mAP down;
  # the run says so at the task that brings the class.
  labels = np.zeros((6, 4), np.uint8)
  labels[:3, 0] = labels[3:, 1] = labels[:2, 2] = 1  # class 3: no positive
  split = Split(labels=labels, image_ids=np.arange(6),
                read_images=lambda idx: np.zeros((len(idx), 4, 4, 3),
                                                 np.uint8))
  source = Source(name="toy", class_names=["a", "b", "c", "d"], train=split,
                  test=split)
  tasks = protocol.make_tasks(4, 2, 2)

  class Predictor:  # scores that rank every positive first: AP 1
    def predict_split(self, variables, split_, rows):
      return split_.labels[rows].astype(np.float32), None

  with caplog.at_level(logging.WARNING, logger="rebll_jax"):
    first = evaluation.evaluate(Predictor(), None, source, tasks[0], tasks,
                                0.8)
    assert not caplog.records
    second = evaluation.evaluate(Predictor(), None, source, tasks[1], tasks,
                                 0.8)
  assert first["map_seen"] == 100.0
  assert second["map_seen"] == 75.0  # a, b, c at AP 1; d at 0
  (record,) = caplog.records
  assert record.getMessage().startswith(
      "task 2: no test image holds d; each such class scores AP 0")
