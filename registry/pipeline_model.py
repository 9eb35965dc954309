"""Model-from-code entry for MLflow: the file MLflow runs to rebuild the pyfunc model at load time
(instead of unpickling an object)."""

from mlflow.models import set_model

from registry.pyfunc import DiffusionPipelineModel

set_model(DiffusionPipelineModel())
