"""The model layer: load and save (``model``), graph queries (``graph``), shape and type
inference (``shapes``) and the layer algebra every pass shares (``layers``)."""
