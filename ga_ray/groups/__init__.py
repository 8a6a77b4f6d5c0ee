"""groups stage: atoms grouped into behaviours without labels (hierarchical clustering), and their discovery score."""
