"""``python -m mm1_megatron.cli <verb> ...``: ``mm1`` without the console script."""

import sys

from mm1_megatron.cli import main

sys.exit(main())
