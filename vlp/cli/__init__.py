"""Thin command-line entry points: parse arguments, build objects, call one library function."""
