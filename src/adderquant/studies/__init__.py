"""Studies that combine the library's parts: the reproduce table, the paper's analyses and
their figures (the only place that draws with matplotlib)."""
