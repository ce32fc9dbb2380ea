"""Notebook 03's two recipes: "project" (this project's defaults, `FinetuneConfig`'s field
defaults) and "official" (the authors' fine-tuning code, tkz05/2D-VoCo-CT-Classifier at
c456755, under `Downstream/3d_1w_contour_cropped_96x256x256/rsna-2023-abdominal-trauma-
detection-main/`: `models/voco_lstm_efficientnetv2t/config.yaml` and, cited by file name,
`src/3d_classification_voco/` (`torch_classification_trainer.py` as trainer.py,
`sequence_models.py`, `transforms.py`, `torch_loss_functions.py`, `torch_datasets.py`,
`heads.py`) and `src/metrics.py`). A recipe fills the settings a caller leaves unset; each is
still overridable. docs/method.md tables every setting against the paper and the official
code. The official recipe names every setting the official code fixes, also where it equals
the project's default; settings without a field here are listed as comments at the end of its
dict.
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "project": {},
    "official": {
        # RNNClassificationModel on efficientnetv2_rw_s (config.yaml:41-43); the folder says
        # "efficientnetv2t", the config and the VoCo checkpoint it loads are V2-S
        # (sequence_models.py:61)
        "backbone": "efficientnetv2_rw_s",
        # the VoCo student's backbone, from a hard-coded file (sequence_models.py:57-69)
        "init": "voco",
        "shape": [96, 256, 256],  # the 96 x 256 x 256 dataset (config.yaml:2)
        # 48 slices at np.linspace(0, d - 1, 48), in training and inference alike
        # (transforms.py:37-39, 60, 98): fixed, evenly spaced
        "n_slices": 48,
        # crop_roi_size [-1, 192, 192] (config.yaml:183): random crop in training
        # (transforms.py:82), centre crop otherwise (transforms.py:106)
        "image_size": 192,
        "global_pool": "avg",  # feature_pooling_type (config.yaml:49; sequence_models.py:139-140)
        "hidden_size": 128,  # LSTM per direction, bidirectional (config.yaml:52, 55)
        "num_layers": 1,  # config.yaml:54
        # dropout_rate (config.yaml:56; sequence_models.py:88); timm's drop_rate 0.1
        # (config.yaml:47) acts on the classifier, replaced by Identity (sequence_models.py:82)
        "dropout": 0.0,
        "pooling": "max",  # max over slices of the BiLSTM output (sequence_models.py:155)
        "freeze_epochs": 0,  # freeze_parameters: False (config.yaml:57)
        # train() defaults to mode "rest_organs" and the caller passes no mode: bowel,
        # kidney, liver and spleen losses only; the extravasation head is never trained
        # (trainer.py:27, 128-142, 520-532)
        "targets": ["bowel", "kidney", "liver", "spleen"],
        "any_injury_weight": 0.0,  # no any-injury term (trainer.py:122-142)
        "slice_loss_weight": 0.0,  # image-level labels unused (trainer.py:94-142)
        # each term is mean over the batch of w * CE, i.e. sum(w * CE) / batch size, with the
        # metric's class weights (torch_loss_functions.py:16-22, 60-66; trainer.py:104-112).
        # "expected" divides by batch size x the training rows' mean weight: the same up to a
        # constant factor per term (its mean weight, 1.02 for bowel to 1.21 for spleen); no
        # field gives the plain batch size
        "loss_normalisation": "expected",
        # random_y_flip_probability, MONAI spatial_axis 2: the image columns, left-right
        # (config.yaml:173; transforms.py:70)
        "hflip_prob": 0.5,
        # random_x_flip_probability, spatial_axis 1: the rows (config.yaml:172; transforms.py:69)
        "vflip_prob": 0.5,
        # random_z_flip_probability, spatial_axis 0: the slice order (config.yaml:171;
        # transforms.py:68)
        "zflip_prob": 0.5,
        # the nearest field, not the same transform: MONAI RandRotate, p 0.1, an angle in
        # [-0.45, 0.45] rad about the third spatial axis, which for (D, H, W) arrays turns the
        # slice-row plane, not the axial one (config.yaml:175-178; transforms.py:72-77); here
        # an in-plane shift / scale / rotation of up to 10 degrees
        "affine_prob": 0.1,
        # the nearest field: OneOf(RandHistogramShift p 0.05, RandAdjustContrast gamma
        # [0.5, 2.5] p 0.05) (config.yaml:179-182; transforms.py:78-81)
        "brightness_contrast_prob": 0.05,
        # the nearest field: RandCoarseDropout, p 0.1, 8 to 16 3-D holes of 4-8 slices x 8-16
        # pixels (config.yaml:184-188; transforms.py:83-91)
        "coarse_dropout_prob": 0.1,
        "batch_size": 4,  # training_batch_size (config.yaml:74; trainer.py:456-463)
        # accumulation_steps: 4 (config.yaml:75) is never read: train() zeroes the gradients
        # and steps the optimizer on every batch (trainer.py:114, 152-158)
        "grad_accum": 1,
        "lr": 1.25e-4,  # config.yaml:83
        "backbone_lr_factor": 1.0,  # one parameter group (trainer.py:502)
        "weight_decay": 1e-5,  # config.yaml:85
        "decay_norm_and_bias": True,  # AdamW over model.parameters() (trainer.py:502)
        "warmup_epochs": 0.0,  # CosineAnnealingLR from step 0, no warmup (config.yaml:86-91)
        # CosineAnnealingLR T_max 5000 (config.yaml:88), stepped every batch (trainer.py:
        # 160-161), periodic: down to eta_min at 5,000 steps, back up at 10,000, down again at
        # 15,000; 20 epochs of about 750 batches are about 15,000 steps
        "lr_cycle_steps": 5000,
        "min_lr_factor": 0.1,  # eta_min 1.25e-5 = lr / 10 (config.yaml:89)
        "grad_clip": 0.0,  # no clipping anywhere in train() (trainer.py:152-158)
        "epochs": 20,  # config.yaml:93; early_stopping_patience 999 (:94)
        "n_folds": 5,  # fold1..fold5 (config.yaml:62; trainer.py:429-431)
        # Official settings without a field here:
        # - precision: fp16 autocast with a GradScaler in training (config.yaml:92;
        #   trainer.py:89-90, 115-117, 152-155), fp32 in validation (:295). Not set: "fp16" is
        #   refused on the CPU; pass precision="fp16" on a GPU.
        # - slice selection fixed in training too (transforms.py:60); here each slice is drawn
        #   within its interval in training.
        # - RandRotate90 in the axial plane, p 0.25 (config.yaml:174; transforms.py:71).
        # - inputs image / 255 without mean/std normalisation (torch_datasets.py:80, 98).
        # - heads: torch's default Linear init, one logit for bowel and extravasation
        #   (heads.py:10-14); here zero weights and the prior as bias, two classes.
        # - best epoch by validation loss (trainer.py:560-566); here by validation RSNA score.
        # - scored per series, no per-patient aggregation (trainer.py:725-743, 746-770).
        # - TTA: logits averaged over the scan and four flips (z-y-x, z-y, z-x, y-x) in test
        #   mode (config.yaml:167-168; trainer.py:664-698).
        # - data: 5 folds over 80 % of the patients (metadata_80folds.parquet, 80_folds.csv:
        #   trainer.py:398, 406; the files are not in the repository). The pretraining split
        #   keeps 629 of 3,147 patients (20 %) out; these are presumably the held-out test
        #   patients. `holdout` is not set here: notebook 05 sets holdout=0.2 for the paper
        #   comparison.
    },
}
