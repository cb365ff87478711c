"""LoRA/QLoRA trainer run by every LoRAJob pod."""
