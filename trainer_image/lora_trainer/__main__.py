"""`python -m lora_trainer`: see lora_trainer.cli."""

import sys

from lora_trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
