"""Analytics tables (``studies``, ``series``, ``instances``) made from the ImagingStudy resources:
the rows (``rows``, pure, no pyarrow), their columns (``columns``, pure) as pyarrow schemas
(``schema``) or arro3 tables (``batches``, the Delta sink: no pyarrow)
and the snapshot export. See docs/tables.md."""
