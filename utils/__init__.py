"""Library behind the scripts: data, models, checkpoints, gradients, the online loop pieces."""
