"""edge_export."""
