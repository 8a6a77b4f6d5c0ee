"""atoms stage."""
