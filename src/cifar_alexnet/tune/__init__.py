"""Optuna tuning of ``train.lr`` and ``model.dropout`` on the validation split: the study,
the objective that wraps training, the runner that tops a study up, its reports and the
``cifar-study`` command."""
