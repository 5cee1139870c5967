"""evaluation.Predictor: padding and sharding never change a row's scores."""

import jax
import numpy as np

from rebll_jax import evaluation, models, parallel
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
