"""Graph-rewrite passes over compiled models (growth, extraction)."""
