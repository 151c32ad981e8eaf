"""What phasewatch makes of an analysis: reports, exports and the view of a live run.

The run report (:mod:`.report`), exports to TensorBoard, CSV, Parquet and W&B with ``--follow``
(:mod:`.export`), and the terminal view of a live run (:mod:`.watch`).  They read :class:`~phasewatch.analysis.pipeline.Analysis` results; files are
opened only through :mod:`phasewatch.store`."""
