"""Datasets, vocabularies and collation."""
