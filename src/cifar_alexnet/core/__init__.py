"""The training core: model, augmentation, fit, data reading. Imports torch and numpy only
(no MLflow, DVC or Optuna), so it runs anywhere torch does, e.g. `PYTHONPATH=src` on a GPU box."""
