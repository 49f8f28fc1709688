"""Whole slides: reading regions and levels, writing pyramids, QuPath GeoJSON objects."""

from stagejax.slides.base import MPP_RANGE, Level, Slide, Tile
from stagejax.slides.geojson import SlideObject, read_geojson, write_geojson
from stagejax.slides.reader import open_slide
from stagejax.slides.writer import write_pyramidal_tiff

__all__ = [
    "MPP_RANGE",
    "Level",
    "Slide",
    "SlideObject",
    "Tile",
    "open_slide",
    "read_geojson",
    "write_geojson",
    "write_pyramidal_tiff",
]
