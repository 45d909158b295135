"""MLflow models-from-code entry point, logged with every registered bundle (nothing is pickled)."""

import mlflow

from components.tracking.pyfunc import BundleModel

mlflow.models.set_model(BundleModel())
