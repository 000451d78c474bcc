"""Utilities every other package uses: typed configs and their errors, atomic files and
safetensors weights, process groups and logging, and the one precision rule. Imports nothing
else of argen's."""
