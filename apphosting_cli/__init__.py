"""The top layer: composition roots that build each process's typed options and call its serve()."""
