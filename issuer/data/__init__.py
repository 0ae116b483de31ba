"""Packaged data files: administrative boundary polygons (GCJ-02 GeoJSON)."""
