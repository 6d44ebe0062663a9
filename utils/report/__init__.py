"""What the runs are turned into: ``tables`` the tables (one writer for .md and .csv), ``plots`` the figures,
``timing`` the costs (medians, floors, peak memory). A new report reads the runs' summary.json / steps.jsonl
files; it never runs anything."""
