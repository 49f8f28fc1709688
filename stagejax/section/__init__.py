"""Whole sections: every detected tubule cut out as the study cut them, staged, reported.

``crops`` cuts tubules at the stage model's pixel size; ``stage`` runs the model
over them in batches; ``outputs`` writes the per-slide CSV, GeoJSON and charts;
``run`` is ``--mode=section`` (one slide or a folder, one host or several);
``export`` turns a corrected ``tubules.geojson`` back into training data.
"""
