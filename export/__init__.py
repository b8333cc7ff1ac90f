"""Converters from other checkpoint formats into vivace packs."""
