"""Small shared helpers (image grids and PNG writing)."""
