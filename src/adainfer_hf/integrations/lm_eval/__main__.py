"""`python -m adainfer_hf.integrations.lm_eval ARGS`: the same as `adainfer lm-eval ARGS`."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
