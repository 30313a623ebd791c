"""Reading results: the metrics of Eqs. 14-16, statistics and Table 1, plots, the report, the
notebook reader of a run directory."""
