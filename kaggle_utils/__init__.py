"""2D-VoCo for RSNA 2023 abdominal trauma CT: everything the notebooks call.

Modules, in pipeline order:
    dicom       DICOM files and series -> Hounsfield units (`read_hu`, `load_series`)
    volume      windowing, body crop, resampling of (slices, H, W) volumes
    preprocess  competition folder -> cached uint8 volumes + metadata table (notebook 01)
    sources     extra unlabeled CT (NIfTI, DICOM folders) for pretraining
    crops, losses, models, pretrain_data, pretrain
                2D-VoCo pretraining (notebook 02)
    metric      the RSNA score, submission validation, the paper's metrics
    classifier, finetune_data, finetune, report
                CNN-BiLSTM cross-validation (notebook 03)
    submission  test DICOMs -> validated submission.csv (notebook 04)
    synthetic   a miniature competition folder for the demo and the tests
    runtime     DDP, RNG state, atomic writes;  paths  Kaggle / Colab / local paths
    plots       figures the notebooks show;  demo  the summary of `make demo`

Submodules are imported explicitly (`from kaggle_utils.dicom import read_hu`) so that importing
one step never pulls in the heavy dependencies of another.
"""

import os

# albumentations asks PyPI for a newer version at import unless told not to: on Kaggle's
# offline scoring run that is a wait for a time-out, and no notebook should phone home.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
