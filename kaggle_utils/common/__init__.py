"""Machinery every stage shares; no stage logic lives here.

paths       where data and outputs live on Kaggle, Colab and a local clone
runtime     device and precision choice, DDP / torchrun, seeding and RNG state
io          atomic writes (text, JSON, torch, parquet) and the CSV training logs
config      run-setting dataclasses and building them from notebook parameters
engine      the one training step, checkpoint and resume, optimizer groups, schedules
backbone    the timm backbone (offline weights), safe weight files, input normalisation
provenance  what made an artifact (version, commit, package versions)
plots       the figures the notebooks show
"""
