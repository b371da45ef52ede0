"""mexp: micro-expression recognition training on MLflow."""
__version__ = "0.1.0"
