"""LoRAJob Kubernetes operator."""
