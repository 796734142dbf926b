"""The training harness: the paper's schedules, a background checkpoint saver, the loop."""

from ckptavg.train.loop import TrainConfig, TrainResult, train
from ckptavg.train.saver import CheckpointSaver
from ckptavg.train.schedules import cyclic_lr, epoch_lr, sgd_lr, swa_lr_at

__all__ = ["CheckpointSaver", "TrainConfig", "TrainResult", "cyclic_lr", "epoch_lr", "sgd_lr",
           "swa_lr_at", "train"]
