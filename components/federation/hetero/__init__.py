"""Heterogeneous client models: client profiles, ensemble distillation, a shared base with personal heads."""
