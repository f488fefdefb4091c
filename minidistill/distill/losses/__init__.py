"""Distillation losses: ``nn.Module``s on plain tensors (logits, hidden states, queries/keys/values)."""
