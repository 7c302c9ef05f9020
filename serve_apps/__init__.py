"""serve_apps."""
