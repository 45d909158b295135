"""MLflow models-from-code entry point, logged with every registered bundle (nothing is pickled).

``components`` resolves to the copy shipped in the model's ``code/`` folder (``code_paths``), which MLflow puts
on ``sys.path`` before running this file, so a registered model loads without this checkout.
"""

import mlflow

from components.tracking.pyfunc import BundleModel

mlflow.models.set_model(BundleModel())
