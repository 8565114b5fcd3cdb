"""Models: the preset registry, loading from every reference, saving, and weight-file conversion."""
