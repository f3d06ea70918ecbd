"""The models a method trains: the policy backbone builder (transformers + peft), its references,
and the reward model (backbone + scalar head)."""
