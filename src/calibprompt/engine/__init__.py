"""The run pipeline: its stages (``pipeline``), the run folder (``artifacts``), one run (``run``) and the
same stages scored on validation shots for tuning (``validation``)."""
