"""QuPath-style GeoJSON reading and writing (stagejax.slides.geojson)."""

import json
import math

import numpy as np
import pytest
from shapely.geometry import MultiPolygon, Polygon, box

from stagejax.errors import DatasetError
from stagejax.slides.geojson import SlideObject, read_geojson, write_geojson

TUBULE = Polygon([(100, 100), (300, 120), (320, 300), (110, 280)])
WITH_LUMEN = Polygon(box(500, 500, 900, 900).exterior.coords,
                     [box(650, 650, 750, 750).exterior.coords])  # fmt: skip
TWO_PARTS = MultiPolygon([box(0, 0, 10, 10), box(20, 20, 35.5, 30.25)])

# What QuPath 0.4/0.5 writes with File > Export objects as GeoJSON (FeatureCollection),
# one annotation with a lumen, one detection as a MultiPolygon of one polygon, a point
# annotation, and a locked, named annotation without a class.
QUPATH_EXPORT = {
    "type": "FeatureCollection",
    "features": [
        {
            "type": "Feature",
            "id": "3b9a1c5e-8f1e-4c43-9a55-0d2b8cf1a001",
            "geometry": {
                "type": "Polygon",
                "coordinates": [
                    [[0, 0], [400, 0], [400, 400], [0, 400], [0, 0]],
                    [[100, 100], [100, 300], [300, 300], [300, 100], [100, 100]],
                ],
            },
            "properties": {
                "objectType": "annotation",
                "classification": {"name": "VII", "color": [255, 170, 0]},
            },
        },
        {
            "type": "Feature",
            "id": "3b9a1c5e-8f1e-4c43-9a55-0d2b8cf1a002",
            "geometry": {
                "type": "MultiPolygon",
                "coordinates": [
                    [[[1000, 1000], [1200, 1000], [1200, 1150], [1000, 1150], [1000, 1000]]]
                ],
            },
            "properties": {
                "objectType": "detection",
                "classification": {"name": "XII", "color": [0, 128, 255]},
                "measurements": {"Area µm^2": 7500.0, "Confidence": 0.82, "Missing": math.nan},
            },  # QuPath writes NaN
        },
        {
            "type": "Feature",
            "id": "3b9a1c5e-8f1e-4c43-9a55-0d2b8cf1a003",
            "geometry": {"type": "Point", "coordinates": [50, 60]},
            "properties": {"objectType": "annotation"},
        },
        {
            "type": "Feature",
            "id": "3b9a1c5e-8f1e-4c43-9a55-0d2b8cf1a004",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[5, 5], [25, 5], [25, 25], [5, 25], [5, 5]]],
            },
            "properties": {"objectType": "annotation", "name": "tissue", "isLocked": True},
        },
    ],
}

# QuPath 0.2/0.3: a bare list, type in "id", packed colorRGB, measurement lists.
QUPATH_02_EXPORT = [
    {
        "type": "Feature",
        "id": "PathDetectionObject",
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[0, 0], [50, 0], [50, 40], [0, 40], [0, 0]]],
        },
        "properties": {
            "classification": {"name": "III", "colorRGB": -16711936},
            "isLocked": False,
            "measurements": [{"name": "Area px", "value": 2000.0}],
        },
    }
]


def test_round_trip_keeps_polygons_classes_and_measurements(tmp_path):
    objects = [
        SlideObject(
            TUBULE,
            "IV",
            (10, 200, 30),
            "detection",
            {"Confidence": 0.91, "Area": 3.5e4},
            {"stageable": True},
            "7d6f2c1a-0000-4000-8000-000000000001",
        ),  # fmt: skip
        SlideObject(WITH_LUMEN, "X", (1, 2, 3), properties={"stageable": False}),
        SlideObject(TWO_PARTS),
    ]
    path = write_geojson(tmp_path / "tubules.geojson", objects)
    back = read_geojson(path)
    assert len(back) == 3
    for a, b in zip(objects, back, strict=True):
        assert b.geometry.equals(a.geometry) and type(b.geometry) is type(a.geometry)
        assert (b.classification, b.color, b.object_type) == (a.classification, a.color,
                                                               a.object_type)  # fmt: skip
        assert b.measurements == a.measurements and b.properties == a.properties and b.id == a.id
    assert back[1].geometry.area == pytest.approx(400 * 400 - 100 * 100)
    assert [p.name for p in tmp_path.iterdir()] == ["tubules.geojson"]  # no temp file left


def test_written_file_has_qupath_structure(tmp_path):
    path = write_geojson(tmp_path / "t.geojson", [
        SlideObject(TUBULE, "VIII", (200, 0, 0), "detection", {"Confidence": np.float32(0.5)},
                    {"stageable": np.bool_(True)})])  # fmt: skip
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 1
    feature = data["features"][0]
    assert feature["type"] == "Feature" and "id" not in feature  # QuPath assigns one
    assert feature["geometry"]["type"] == "Polygon"
    ring = feature["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and ring[0] == [100, 100]  # closed, level-0 pixels
    assert feature["properties"] == {
        "objectType": "detection",
        "classification": {"name": "VIII", "color": [200, 0, 0]},
        "measurements": {"Confidence": 0.5},
        "stageable": True,
    }


def test_reads_a_qupath_export(tmp_path):
    path = tmp_path / "export.geojson"
    path.write_text(json.dumps(QUPATH_EXPORT, ensure_ascii=False), encoding="utf-8")
    objects = read_geojson(path)
    assert len(objects) == 3  # the point is skipped
    annotation, detection, named = objects
    assert annotation.object_type == "annotation" and annotation.classification == "VII"
    assert annotation.color == (255, 170, 0) and annotation.geometry.area == 400 * 400 - 200 * 200
    assert annotation.id == "3b9a1c5e-8f1e-4c43-9a55-0d2b8cf1a001"
    assert isinstance(detection.geometry, Polygon)  # a MultiPolygon of one polygon
    assert detection.object_type == "detection" and detection.classification == "XII"
    assert detection.measurements["Confidence"] == 0.82
    assert detection.measurements["Area µm^2"] == 7500.0
    assert math.isnan(detection.measurements["Missing"])
    assert named.classification is None and named.properties == {"name": "tissue", "isLocked": True}


def test_reads_a_qupath_02_list_export(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps(QUPATH_02_EXPORT))
    (obj,) = read_geojson(path)
    assert obj.object_type == "detection" and obj.id is None
    assert obj.classification == "III" and obj.color == (0, 255, 0)
    assert obj.measurements == {"Area px": 2000.0}
    assert obj.geometry.equals(box(0, 0, 50, 40))


def test_invalid_polygon_is_made_valid(tmp_path):
    bowtie = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}, "properties": {}}  # fmt: skip
    path = tmp_path / "bowtie.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [bowtie]}))
    (obj,) = read_geojson(path)
    assert obj.geometry.is_valid and obj.geometry.area == pytest.approx(50)
    assert obj.object_type == "annotation"  # QuPath's default without a type


@pytest.mark.parametrize(
    "text, words",
    [
        ("{not json", "not valid JSON"),
        ('{"type": "Topology"}', "neither a FeatureCollection"),
        (
            '[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
            "[[[0, 0], [1, 1]]]}}]",
            "feature 0: malformed geometry",
        ),
        (
            '[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
            '[[[0, 0], [4, 0], [4, 4], [0, 0]]]}, "properties": {"measurements": {"a": "big"}}}]',
            "measurement 'a' is 'big', not a number",
        ),
    ],
)
def test_bad_files_give_one_line(tmp_path, text, words):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(DatasetError) as e:
        read_geojson(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and words in msg
