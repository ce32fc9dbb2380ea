"""Stage 4 (notebook 04): test DICOMs -> a validated `submission.csv`, offline.

Entry point: `inference.predict_test_set(...)`.
"""
