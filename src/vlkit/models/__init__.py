"""Model families: configs, blocks and top-level models (construction is pure and offline)."""
