"""routerctl: the command-line client of routerd."""
