"""Every (method, compression) of the experiments builds and initialises on the models."""

import pytest
from flax import nnx

from vcon_experiments import config as config_lib
from vcon_experiments import methods
from vcon_experiments.models import get_model


@pytest.mark.parametrize("compression", config_lib.COMPRESSIONS)
@pytest.mark.parametrize("method", config_lib.METHODS)
@pytest.mark.parametrize("model", ["cnn"])
def test_method_builds_on_model(method, compression, model):
  kwargs = {"features": (16, 32), "hidden": 64} if model == "cnn" else {}
  params = nnx.state(get_model(model, rngs=nnx.Rngs(0), **kwargs), nnx.Param).to_pure_dict()
  cfg = config_lib.Config(model=model, method=method, compression=compression, steps=100)
  transform, schedule, distill = methods.build(cfg, params)
  state = transform.init(params)
  assert float(schedule(0)) == (1.0 if method.startswith("vcon") else 0.0)
  assert float(schedule(100)) == 0.0
  assert (distill > 0) == (method == "vcon-distill")
  assert state is not None
