"""2D-VoCo for RSNA 2023 abdominal trauma CT: everything the notebooks call.

One sub-package per stage, in pipeline order, each with one entry point its notebook calls:
    cache         01  DICOM series -> cached, windowed volumes (`preprocess.preprocess_dataset`)
    pretrain      02  2D-VoCo self-supervised pretraining (`train.pretrain`)
    finetune      03  CNN-BiLSTM cross-validation (`train.run_cross_validation`)
    submission    04  test DICOMs -> validated submission.csv (`inference.predict_test_set`)
    experiments   05  the paper's comparisons as one batch (`runner.run_experiment`)
    segmentation  06  organ segmentation, boxes and organ crops (`train.run_segmentation`)
and around them:
    metric        the RSNA score, submission validation, the paper's metrics
    common        paths, runtime, atomic io, configs, the training engine, backbone, plots
    demo          the synthetic demo data and the `make demo` summary (tools)
    bundle        the offline Kaggle bundle builder (a tool)

Imports follow the data (tests/test_layout.py keeps them so): the cache feeds pretraining and
segmentation, organ crops feed fine-tuning, fine-tuned models feed the submission and the
experiments; every stage may use `common` and `metric`, none another's private names. Modules are
imported explicitly (`from kaggle_utils.cache.dicom import read_hu`) so that importing one step
never pulls in the heavy dependencies of another.
"""

import os
import warnings

# timm imports huggingface_hub, which imports tqdm.auto: in a Jupyter kernel without ipywidgets
# (papermill, Kaggle's scoring run) that prints "IProgress not found" into every notebook. The
# bars here are tqdm.std and never need the widget.
warnings.filterwarnings("ignore", message="IProgress not found")

# albumentations asks PyPI for a newer version at import unless told not to: on Kaggle's
# offline scoring run that is a wait for a time-out, and no notebook should phone home.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
