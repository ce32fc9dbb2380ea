"""Stage 3 (notebook 03): the CNN-BiLSTM fine-tuned with patient-grouped cross-validation.

Entry point: `train.run_cross_validation(config)` (`python -m kaggle_utils.finetune.train`
under torchrun).

    model        backbone per slice, BiLSTM over slices, one head per organ target
    data         labelled series table, folds, the slice-stack dataset
    losses       the competition loss (metric-weighted CE, any-injury, per-slice)
    train        the cross-validation loop and its outputs
    predict      series and patient probabilities, fold models read back
    calibration  post-hoc calibration fitted on out-of-fold predictions
    report       the cross-validation report (RSNA score, its parts, the paper metrics)
    importance   which slices drove each prediction
"""
