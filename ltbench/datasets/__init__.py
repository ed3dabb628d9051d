"""Dataset catalogs: one module per dataset, each reading a root into `Record`s.

`open_catalog(dataset, root)` is the single entry point; `resolve_root` applies the
`--root` / `$LTBENCH_DATA/<dataset>` rule.
"""

from ltbench.datasets.base import ANOMALY, NORMAL, Catalog, Record

__all__ = ["ANOMALY", "NORMAL", "Catalog", "Record"]
