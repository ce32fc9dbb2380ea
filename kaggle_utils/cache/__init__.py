"""Stage 1 (notebook 01): competition DICOMs -> cached, windowed uint8 volumes.

Entry point: `preprocess.preprocess_dataset(config)`.

    dicom       DICOM files and series -> Hounsfield units (`read_hu`, `load_series`)
    volume      windowing, body crop, resampling of (slices, H, W) volumes
    preprocess  the cache: one `.npy` per series and shape plus the metadata table
    sources     extra unlabeled CT (NIfTI, DICOM folders) cached the same way for pretraining
"""
