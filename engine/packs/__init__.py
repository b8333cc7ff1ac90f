"""Packs on disk, whatever their family: the manifest, its typed records and the registry of families."""
