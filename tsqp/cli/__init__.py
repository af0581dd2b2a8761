"""The `tsqp` command line: one module per command, shared options in `options`, `main` in `app`."""
