"""`python -m kaggle_utils.demo <folder> [options]`: write the synthetic competition folder."""

import sys

from kaggle_utils.demo.generator import main

if __name__ == "__main__":
    sys.exit(main())
