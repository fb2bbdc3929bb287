"""ScaleKD as a library: pure PyTorch, no file or network I/O."""
