"""CIFAR-10 -> AlexNet reference pipeline: data, model, training, evaluation, tracking."""

__version__ = "0.1.0"
