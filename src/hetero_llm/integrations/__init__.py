"""Per-library integration tables (which module plays which role)."""
