"""2D-VoCo for RSNA 2023 abdominal trauma CT: everything the notebooks call.

Modules, in pipeline order:
    dicom       DICOM files and series -> Hounsfield units (`read_hu`, `load_series`)
    volume      windowing, body crop, resampling of (slices, H, W) volumes
    preprocess  competition folder -> cached uint8 volumes + metadata table (notebook 01)
    synthetic   a miniature competition folder for the demo and the tests
    paths       where data and outputs live on Kaggle, Colab and locally
    plots       figures the notebooks show

Submodules are imported explicitly (`from kaggle_utils.dicom import read_hu`) so that importing
one step never pulls in the heavy dependencies of another.
"""

__version__ = "0.1.0"
