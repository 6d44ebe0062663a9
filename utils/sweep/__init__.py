"""Many runs (reproduce.py, experiments/grid.py): ``presets`` the reproduction's presets and rows, ``overrides``
their overrides from the command line, ``reuse`` the reuse of finished runs and burn-ins, ``runs`` the sweep, and
``on_ray`` the same sweep as Ray tasks."""
