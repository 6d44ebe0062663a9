"""The federated run as a Flower app (flower-app/pyproject.toml)."""
