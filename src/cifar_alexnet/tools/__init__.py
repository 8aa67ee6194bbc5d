"""Tools around the pipeline, never a stage's dependency: the benchmark, the synthetic
CIFAR-10 archive maker and check-metrics. Editing them retrains nothing."""
