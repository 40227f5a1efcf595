"""Adapters that plug sealed weights into serving engines; each imports its engine lazily."""
