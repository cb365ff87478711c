"""The contract between the LoRAJob operator and its trainer pods.

Both images install this one distribution (`loraops-contract`), so the two sides
can never disagree about it:

* `config`: TrainerConfig, the one validated job configuration (the LoRAJob spec
  embeds it, the CRD schema is generated from it, the trainer runs from it);
* `rules`: the spec rules pydantic and the CRD's CEL both enforce, each written once;
* `endpoints`: which storage endpoints count as private (policy check and trainer);
* `protocol`: env names, exit codes, and the progress and termination schemas;
* `manifest`: the adapter's manifest.json (the trainer writes it, `kubectl lj` checks it);
* `reasons`: the one vocabulary of failure reasons, from trainer exit to job condition.

Only pydantic is needed: no torch, no Kubernetes client.
"""
