"""The promoted model's code (MLflow "models from code"): `promote` logs this file's path as
`python_model`, and MLflow runs it when the model loads instead of unpickling an object.

The class is `mexp.serving.pyfunc.MERModel`, shipped with the model in `code/mexp` (code_paths); its
weights, config and classes come from the model's `bundle` artifact in `load_context`.
"""
from mlflow.models import set_model

from mexp.serving.pyfunc import MERModel

set_model(MERModel())
