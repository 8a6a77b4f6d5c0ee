"""ekfac stage."""
