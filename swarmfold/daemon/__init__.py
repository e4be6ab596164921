"""Running in the background: lifecycle, signals, control API, metrics, dashboard, settings."""
