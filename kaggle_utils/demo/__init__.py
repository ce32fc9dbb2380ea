"""Tools: the synthetic demo data and the summary of `make demo`.

generator     the dataset: plan, tables, the folder written atomically
              (`python -m kaggle_utils.demo <folder>`); its docstring tells the whole story
labels        the competition tables' columns, class prevalences, sampled patient labels
anatomy       organs, vessels and bowel as shapes, and the injuries sampled into them
render        a phantom -> Hounsfield units and organ labels for one series view
dicom_writer  HU -> DICOM files (encodings, transfer syntaxes), series and segmentations
summary       what each `make demo` step produced (`python -m kaggle_utils.demo.summary`)
"""
