"""Domain expert ensembles (HDEE): built in a later issue."""
