"""Reports: the analysis of a stored run, its tables and its figures."""
