"""`kubectl lj`: the LoRAJob kubectl plugin (console script `kubectl-lj`).

Like `kubectl cnpg` or `kueuectl`, it speaks the operator's language on top of the
user's kubeconfig (the official client's loader: KUBECONFIG, --kubeconfig, --context,
the context's namespace):

    kubectl lj progress [NAME ...] [-w]   a progress bar per job (-w: live until done)
    kubectl lj logs NAME [-f]             the current attempt's trainer log (-f: follows
                                          it, and the next attempts, until the job ends)
    kubectl lj adapter NAME [-o DIR]      downloads the adapter and verifies every file
                                          against its manifest (size + sha256)
    kubectl lj why NAME                   the failure reason, hint and last log lines

Pods are found by the labels the operator sets (job uid + attempt), never by name, so
any job name works. Modules: `view` (pure rendering of a job), `manifest` (adapter
verification), `cluster` (the API calls, with the official `kubernetes` client),
`commands`, `cli` (arguments, entry point).
"""

from lorajob_operator.kubectl_lj.cli import main

__all__ = ["main"]
