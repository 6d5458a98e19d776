"""How results are shown: rich tables, bars and progress on stderr, JSON documents on stdout.

The only package that imports rich. `console` holds the streams and the one-line messages,
`common` the pieces several commands show, and each command has its module, named after it.
"""
