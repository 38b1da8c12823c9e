"""Thin entry points: parse a typed config, build the context, call the library, exit.

Every job here answers ``--help`` without starting Spark or importing torch: heavy imports
happen inside ``main`` after the arguments are parsed.
"""
