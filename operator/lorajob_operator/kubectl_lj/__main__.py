"""`python -m lorajob_operator.kubectl_lj`: the same as the kubectl-lj console script."""

import sys

from lorajob_operator.kubectl_lj.cli import main

sys.exit(main())
