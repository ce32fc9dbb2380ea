"""Stage 2 (notebook 02): 2D-VoCo self-supervised pretraining of the 2D backbone.

Entry point: `train.pretrain(config)` (`python -m kaggle_utils.pretrain.train` under torchrun).

    crops   base and random crops and their position labels
    data    unlabeled volumes -> augmented crops, one resumable order per epoch
    losses  intra, inter and regularisation losses
    model   projection head, crop encoder, EMA student-teacher pair
    train   the loop, the position probe, the exported encoder
"""
