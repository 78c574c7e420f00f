"""Analytics tables (``studies``, ``series``, ``instances``) made from the ImagingStudy resources:
the rows (``rows``, pure, no pyarrow), their Arrow schemas (``schema``, needs the tables extra)
and the snapshot export. See docs/tables.md."""
