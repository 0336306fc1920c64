"""The store: atomic, checksummed file I/O and the run directory (units, completion records, locks)."""
