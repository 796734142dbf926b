"""Networks and data: the model registry and builders, data sets and loaders, BatchNorm
recalibration, evaluation and calibration scores. Everything here imports torch."""
