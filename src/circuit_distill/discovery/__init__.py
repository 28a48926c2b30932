"""discovery stage."""
