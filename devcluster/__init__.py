"""A real local Kubernetes cluster for tests, the demo and the benchmarks.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and Kueue are built
from their Go modules (`binaries`) and started on 127.0.0.1 with generated PKI and
RBAC (`cluster`, `kueue`); a process kubelet runs pods as local processes
(`kubelet`); SeaweedFS serves S3 (`s3`); `controlplane.ControlPlane` puts them
together with the operator. Importing this package starts nothing.
"""
