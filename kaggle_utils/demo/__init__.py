"""Tools: the synthetic demo data and the summary of `make demo`.

generator  a deterministic miniature of the competition folder (`python -m kaggle_utils.demo`)
summary    what each demo step produced (`python -m kaggle_utils.demo.summary`)
"""
