"""Model resolution and loading (hub ids and local directories)."""
