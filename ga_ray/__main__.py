"""`python -m ga_ray` is the `ga-ray` command."""

from ga_ray.cli import main

main()
