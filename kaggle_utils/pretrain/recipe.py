"""Notebook 02's two recipes: "project" (this project's defaults, `PretrainConfig`'s field
defaults) and "official" (the authors' code, tkz05/2D-VoCo-CT-Classifier at c456755:
`VoCo/voco_train.py`, `VoCo/models/voco_head.py`, `VoCo/utils/data_utils.py` and
`VoCo/optimizers/lr_scheduler.py`, cited below by file name). A recipe fills the settings a
caller leaves unset; each is still overridable. docs/method.md tables every setting against
the paper and the official code. The official recipe names every setting the official code
fixes, also where it equals the project's default, so that it does not drift when a default
changes; settings the official code has but no field here can express are listed as comments
at the end of its dict.
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "project": {},
    "official": {
        # VoCoHeadV2 hard-codes timm's efficientnet_b0 (voco_head.py:59; the comments at :61
        # and :75 name v2t and v2s as hand edits). The official fine-tuning trains
        # efficientnetv2_rw_s from a V2-S VoCo checkpoint (its config.yaml:43,
        # sequence_models.py:61), so a b0 encoder could not feed it: V2-S here. The paper
        # reports EfficientNetV2-T and -S.
        "backbone": "efficientnetv2_rw_s",
        # student and teacher both built with timm's pretrained=True (voco_head.py:60-73)
        "init": "imagenet",
        # a 3 x 3 grid of 64 x 64 base crops over the 192 x 192 slice (data_utils.py:474-481,
        # 178, 190)
        "grid": 3,
        "crop_size": 64,  # roi 64 (voco_train.py:175, 194-196; data_utils.py:437, 474)
        # sw_batch_size 2 random crops per volume (voco_train.py:198; data_utils.py:293)
        "n_random": 2,
        # overlap area / crop area (data_utils.py:531-543)
        "label_mode": "area",
        # features averaged over the 32 slices before the projector (voco_head.py:121-123)
        "slice_mode": "average",
        # forward_features' map flattened, 5120 = 1280 x 2 x 2 for b0 (voco_head.py:75, 105,
        # 111-114)
        "projector_input": "flatten",
        "hidden_dim": 2048,  # ProjectionHead(hidden_dim=2048, ...) (voco_head.py:30)
        "out_dim": 2048,  # ProjectionHead(..., out_dim=2048) (voco_head.py:30)
        # F.dropout(p=0.2) on the student's features (voco_head.py:106)
        "feature_dropout": 0.2,
        # on every slice's feature map, before the mean over slices (voco_head.py:106, 122)
        "feature_dropout_at": "slice",
        # EMA of the backbone only (voco_head.py:79-82); the teacher's projector is a head of
        # its own on detached features, trained by gradient through the intra loss
        # (voco_head.py:76, 129-130, 138; the inter loss detaches it, :204)
        "teacher_head": "trained",
        # BatchNorm1d(2048) applied to a [B, crops, D] tensor takes the crop axis for its
        # channels: each crop position normalised over the batch and the features
        # (voco_head.py:34, 39, 128, 130)
        "projector_norm": "crops",
        # hard-coded (voco_head.py:80); --momentum feeds SGD only (voco_train.py:201, 261)
        "momentum": 0.9,
        "momentum_end": None,  # constant (voco_head.py:80)
        # overlap-weighted -log(1 - |l - y|) plus y^2 where l = 0 (voco_head.py:138-146, 226-239)
        "intra_form": "voco_code",
        # the same form with the teacher's detached similarities as labels (voco_head.py:181-211)
        "inter_form": "voco_code",
        # relu(cos)^2 with one side detached, mean over base pairs i < j (voco_head.py:242-258)
        "reg_form": "voco_code",
        "intra_weight": 1.0,  # alpha (voco_train.py:76, 79)
        "inter_weight": 1.0,  # beta (voco_train.py:77, 79)
        "reg_weight": 1.0,  # gamma (voco_train.py:78, 79)
        "steps": 250_000,  # --num_steps (voco_train.py:179, 298)
        "batch_size": 4,  # --batch_size, the DataLoader's (voco_train.py:197; data_utils.py:233)
        "grad_accum": 1,  # one optimizer step per batch (voco_train.py:94-111)
        "lr": 1e-4,  # --lr (voco_train.py:199)
        # AdamW without weight_decay=: torch's default 0.01 (voco_train.py:258; --decay 0.1 at
        # :200 feeds Adam and SGD only)
        "weight_decay": 1e-2,
        "decay_norm_and_bias": True,  # one group, model.parameters() (voco_train.py:258)
        "amsgrad": True,  # AdamW(..., amsgrad=True) (voco_train.py:258)
        "warmup_steps": 5_000,  # --warmup_steps (voco_train.py:181, 274)
        # WarmupCosineSchedule: linear warmup, then cosine to 0 at num_steps
        # (lr_scheduler.py:85-89), stepped every batch (voco_train.py:109-110)
        "min_lr_factor": 0.0,
        # clipping exists only on the non-AMP path and only with --grad_clip (store_true, off);
        # args.amp = True is forced, so it never runs (voco_train.py:95-103, 210, 221)
        "grad_clip": 0.0,
        # VoCoAugmentation2D(args, aug=False): the flips, rot90 and intensity shift of
        # data_utils.py:444-456 and 483-500 never run (data_utils.py:179, 191)
        "flip_prob": 0.0,
        "rot90_prob": 0.0,  # aug=False (data_utils.py:179, 191)
        "intensity": 0.0,  # aug=False (data_utils.py:179, 191)
        # Official settings without a field here:
        # - precision: fp16 autocast with a GradScaler, forced (voco_train.py:72, 221,
        #   294-295). Not set: "fp16" is refused on the CPU; pass precision="fp16" on a GPU.
        # - volumes: foreground crop (threshold 0.3) and resize to 192 x 192 x 64, then 32
        #   evenly spaced slices (data_utils.py:176-178, 188-190, 241-243, 353-361); inputs in
        #   [0, 1] without mean/std normalisation (:175, 187). Here the slices come from
        #   notebook 01's cache (notebook 02's `volume_shape`, 32 x 192 x 192) and the
        #   backbone's mean/std is applied.
        # - data: the RSNA "training" list of VoCo/jsons/20250327_pretrain_dataset_split.json
        #   (3,779 series, 2,518 patients) plus FLARE23's 2,131 volumes (data_utils.py:75-84,
        #   106, 131, 146, 211-215); its "validation" list (932 series, 629 other patients) is
        #   loaded but never used (:142). Here: `exclude_patients` (notebook 02's `holdout`)
        #   and `extra_dirs`.
        # - order: no shuffling, the same order every epoch (data_utils.py:232-235).
        # - teacher projector: initialised independently of the student's (voco_head.py:75-76);
        #   here it starts as a copy.
        # - EMA: parameters only, inside the forward, before the optimizer step
        #   (voco_head.py:81-82, 109); here after it, BatchNorm buffers copied (the teacher
        #   runs in train mode, on batch statistics, in both).
        # - NaN losses and exceptions skipped silently (voco_train.py:81-92, 104-107); here an
        #   error.
        # - --use_checkpoint (voco_train.py:185) is never read: no gradient checkpointing, which
        #   changes memory only (`grad_checkpointing` is left at its default).
    },
}
