"""TIR kernel generators, one module per kernel family."""
