"""Ray jobs that are not deployments (``ray job submit`` entry points)."""
