"""Writers of trained adapters in the formats other tools load (a merged full model)."""
