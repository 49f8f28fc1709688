"""QuPath-style GeoJSON: objects on a slide as polygons in level-0 pixel coordinates.

The structure is the one QuPath (>= 0.4) exports with "Export as GeoJSON" and
imports with "Import objects from file"::

    {"type": "FeatureCollection", "features": [
      {"type": "Feature", "id": "<uuid, optional>",
       "geometry": {"type": "Polygon", "coordinates": [[[x, y], ...]]},
       "properties": {"objectType": "annotation" | "detection",
                      "classification": {"name": "VII", "color": [r, g, b]},
                      "measurements": {"Confidence": 0.93, ...},
                      "stageable": true, ...}}]}

Coordinates are pixels of the full-resolution image, origin at its top-left.
Reading also takes what older QuPath versions wrote: a bare list of Features,
the object type in "id" (v0.2), "colorRGB" packed colours and measurement
lists of {"name", "value"} (v0.2-0.3), derived classes as "names". Properties
that are not QuPath's (e.g. "stageable") are kept as they are; QuPath itself
ignores them on import.
"""

import dataclasses
import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, shape

from stagejax.errors import DatasetError
from stagejax.runtime.files import atomic_write_text

log = logging.getLogger(__name__)

OBJECT_TYPES = ("annotation", "detection", "cell", "tile", "tmaCore", "root")
# QuPath v0.2 wrote the object type as the feature's "id".
_LEGACY_TYPES = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection",
                 "PathCellObject": "cell", "PathTileObject": "tile",
                 "TMACoreObject": "tmaCore", "PathRootObject": "root"}  # fmt: skip
_OWN_KEYS = ("objectType", "object_type", "classification", "measurements")
# What shapely raises for malformed coordinates (too few points, ragged lists, bad type).
_GEOMETRY_ERRORS = (ValueError, TypeError, KeyError, IndexError, shapely.errors.ShapelyError)


@dataclasses.dataclass
class SlideObject:
    """One QuPath object: a polygonal outline plus its class and measurements."""

    geometry: Polygon | MultiPolygon  # level-0 pixel coordinates
    classification: str | None = None  # e.g. the stage name "VII"
    color: tuple[int, int, int] | None = None  # the classification's colour
    object_type: str = "annotation"
    measurements: dict[str, float] = dataclasses.field(default_factory=dict)
    properties: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. stageable
    id: str | None = None  # QuPath's UUID; QuPath assigns one on import if absent


def _polygonal(geom) -> Polygon | MultiPolygon | None:
    """The polygonal part of `geom` made valid; one polygon if there is only one."""
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    if isinstance(geom, shapely.GeometryCollection | MultiPolygon):
        polys = [p for g in getattr(geom, "geoms", [geom]) for p in _parts(g)]
        geom = MultiPolygon(polys) if len(polys) > 1 else (polys[0] if polys else None)
    if geom is None or not isinstance(geom, Polygon | MultiPolygon) or geom.is_empty:
        return None
    return geom


def _parts(geom) -> list[Polygon]:
    if isinstance(geom, Polygon):
        return [] if geom.is_empty else [geom]
    if isinstance(geom, MultiPolygon | shapely.GeometryCollection):
        return [p for g in geom.geoms for p in _parts(g)]
    return []  # points and lines have no area


def _coords(geom, precision: int):
    def ring(r):
        return [[round(x, precision), round(y, precision)] for x, y in r.coords]

    def poly(p):
        return [ring(p.exterior)] + [ring(i) for i in p.interiors]

    if isinstance(geom, Polygon):
        return {"type": "Polygon", "coordinates": poly(geom)}
    return {"type": "MultiPolygon", "coordinates": [poly(p) for p in geom.geoms]}


def to_feature(obj: SlideObject, precision: int = 2) -> dict:
    """The GeoJSON Feature QuPath reads for `obj` (coordinates rounded to `precision`)."""
    geom = _polygonal(obj.geometry)
    if geom is None:
        raise ValueError(f"object {obj.classification!r} has no polygonal area")
    props: dict[str, Any] = {"objectType": obj.object_type}
    if obj.classification is not None:
        cls: dict[str, Any] = {"name": obj.classification}
        if obj.color is not None:
            cls["color"] = [int(c) for c in obj.color]
        props["classification"] = cls
    if obj.measurements:
        props["measurements"] = {k: float(v) for k, v in obj.measurements.items()}
    props.update({k: v for k, v in obj.properties.items() if k not in _OWN_KEYS})
    feature: dict[str, Any] = {"type": "Feature"}
    if obj.id is not None:
        feature["id"] = obj.id
    feature["geometry"] = _coords(geom, precision)
    feature["properties"] = props
    return feature


def write_geojson(path: str | Path, objects: Iterable[SlideObject], precision: int = 2) -> Path:
    """Writes `objects` as one FeatureCollection, atomically (temp file + rename)."""
    path = Path(path)
    features = [to_feature(o, precision) for o in objects]
    collection = {"type": "FeatureCollection", "features": features}
    text = json.dumps(collection, separators=(",", ":"), default=_json_default)
    atomic_write_text(path, text + "\n")
    return path


def _json_default(value):
    """numpy scalars and arrays (e.g. a flag computed with numpy) as JSON values."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _color(value, where: str) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):  # QuPath <= 0.3 "colorRGB": packed (A)RGB, often negative
        value &= 0xFFFFFF
        return (value >> 16) & 255, (value >> 8) & 255, value & 255
    if isinstance(value, list) and len(value) == 3 and all(isinstance(c, int) for c in value):
        return tuple(value)
    raise DatasetError(f"{where}: colour {value!r} is neither [r, g, b] nor a packed RGB integer")


def _classification(value, where: str) -> tuple[str | None, tuple[int, int, int] | None]:
    if value is None:
        return None, None
    if isinstance(value, str):
        return value, None
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: classification {value!r} is not an object")
    name = value.get("name")
    if name is None and isinstance(value.get("names"), list):  # derived class, e.g. A: B
        name = ": ".join(str(n) for n in value["names"])
    return name, _color(value.get("color", value.get("colorRGB")), where)


def _measurements(value, where: str) -> dict[str, float]:
    if value is None:
        return {}
    if isinstance(value, list):  # QuPath <= 0.3: [{"name": ..., "value": ...}]
        try:
            value = {m["name"]: m["value"] for m in value}
        except (TypeError, KeyError):
            raise DatasetError(f"{where}: measurements list without name/value pairs") from None
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: measurements are {type(value).__name__}, not an object")
    out = {}
    for k, v in value.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise DatasetError(f"{where}: measurement {k!r} is {v!r}, not a number")
        out[k] = math.nan if v is None else float(v)
    return out


def from_feature(feature: dict, where: str) -> SlideObject | None:
    """The object of one Feature; None if it has no polygonal area (points, lines)."""
    if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
        raise DatasetError(f"{where}: not a GeoJSON Feature with a geometry")
    try:
        geom = shape(feature["geometry"])
    except _GEOMETRY_ERRORS as e:
        raise DatasetError(f"{where}: malformed geometry: {e}") from None
    geom = _polygonal(geom)
    if geom is None:
        return None
    props = feature.get("properties") or {}
    if not isinstance(props, dict):
        raise DatasetError(f"{where}: properties are not an object")
    fid = feature.get("id")
    object_type = props.get("objectType", props.get("object_type"))
    if object_type is None:
        object_type = _LEGACY_TYPES.get(fid, "annotation")
    if fid in _LEGACY_TYPES:
        fid = None
    name, color = _classification(props.get("classification"), where)
    return SlideObject(
        geometry=geom,
        classification=name,
        color=color,
        object_type=str(object_type),
        measurements=_measurements(props.get("measurements"), where),
        properties={k: v for k, v in props.items() if k not in _OWN_KEYS},
        id=None if fid is None else str(fid),
    )


def read_geojson(path: str | Path) -> list[SlideObject]:
    """The polygonal objects of a QuPath GeoJSON export (FeatureCollection or Feature list)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such GeoJSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON: {e}") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        features = data
    if not isinstance(features, list):
        raise DatasetError(f"{path}: neither a FeatureCollection nor a list of Features")
    objects, skipped = [], 0
    for i, feature in enumerate(features):
        obj = from_feature(feature, f"{path}: feature {i}")
        if obj is None:
            skipped += 1
        else:
            objects.append(obj)
    if skipped:
        log.warning("%s: %d feature(s) without an area (points, lines) skipped", path, skipped)
    return objects
