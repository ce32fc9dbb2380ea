"""Stage 5 (notebook 05): the paper's experiments as one batch of notebook runs.

Entry point: `runner.run_experiment(config)`.
"""
