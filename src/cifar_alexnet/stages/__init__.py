"""The DVC stages (download, prepare, train, evaluate): files and tracking around the core.
The scripts in pipeline/ parse arguments and call these."""
