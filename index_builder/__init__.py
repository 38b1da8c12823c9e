"""index_builder."""
